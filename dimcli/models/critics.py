"""Critics: the learned embeddings whose dot products give the MI scores.

Each critic is the same block (the paper's "encode-and-dot-product" design): a two-layer
non-linear branch plus a linear shortcut, summed, then LayerNorm over the `units` channels.
On feature maps the layers are 1x1 convolutions, so every location is embedded alike.
"""

from __future__ import annotations

from torch import Tensor, nn


class MIBlock(nn.Module):
    """x -> LayerNorm(W2 ReLU(BN(W1 x)) + Ws x), per location for feature maps.

    Args:
        in_dim: input channels (maps) or features (vectors).
        units: output width u ("mi_units"; 2048 in the authors' code).
        spatial: True for (N, C, H, W) inputs (1x1 convolutions), False for (N, C).
    """

    def __init__(self, in_dim: int, units: int, *, spatial: bool) -> None:
        super().__init__()
        self.spatial = spatial
        if spatial:
            self.branch = nn.Sequential(
                nn.Conv2d(in_dim, units, 1, bias=False),
                nn.BatchNorm2d(units),
                nn.ReLU(inplace=True),
                nn.Conv2d(units, units, 1),
            )
            self.shortcut: nn.Module = nn.Conv2d(in_dim, units, 1)
        else:
            self.branch = nn.Sequential(
                nn.Linear(in_dim, units, bias=False),
                nn.BatchNorm1d(units),
                nn.ReLU(inplace=True),
                nn.Linear(units, units),
            )
            self.shortcut = nn.Linear(in_dim, units)
        self.norm = nn.LayerNorm(units)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x) + self.shortcut(x)  # (N, u, H, W) or (N, u)
        if self.spatial:
            # LayerNorm over channels only, separately at each location.
            return self.norm(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(out)
