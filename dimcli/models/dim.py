"""DIMModel: an encoder, its critics and the weighted Deep InfoMax objective (paper Eq. 8).

    loss = alpha * global_MI_loss + beta * local_MI_loss + gamma * prior_loss

The prior discriminator is not part of this module: it is the other player of a min-max, with
its own optimiser and step (see `dimcli.models.prior`), and is passed in to `forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dimcli.models.critics import MIBlock
from dimcli.models.encoders import Encoder
from dimcli.models.prior import discriminator_loss, prior_loss
from dimcli.objectives import ESTIMATORS, KERNELS, local_mi

# (local (N, u, H, W), global (N, u), estimator) -> (loss, estimate), like `local_mi`.
Scorer = Callable[[Tensor, Tensor, str], tuple[Tensor, Tensor]]

# (alpha, beta, gamma) of the paper's headline models.
PRESETS: dict[str, tuple[float, float, float]] = {
    "dim-l": (0.0, 1.0, 0.1),
    "dim-g": (1.0, 0.0, 1.0),
    "dim-lg": (0.5, 0.1, 0.1),
}


@dataclass
class LossTerms:
    """What one forward pass of the objective produced.

    `terms` holds the unweighted loss of each active term ("global", "local", "prior");
    `total` is their weighted sum; `estimates` the MI estimates in nats (detached).
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    estimates: dict[str, Tensor] = field(default_factory=dict)
    y: Tensor | None = None


class DIMModel(nn.Module):
    """Encoder plus the critics of every term with a non-zero weight.

    Args:
        encoder: a registered `Encoder`.
        estimator: "jsd", "nce" or "dv".
        alpha, beta, gamma: weights of the global, local and prior terms.
        mi_units: critic width u.
        kernel: local-MI implementation, see `dimcli.objectives.local_mi`.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        estimator: str = "jsd",
        alpha: float = 0.0,
        beta: float = 1.0,
        gamma: float = 0.1,
        mi_units: int = 2048,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}"
            )
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if min(alpha, beta, gamma) < 0 or alpha == beta == gamma == 0:
            raise ValueError(
                f"alpha, beta and gamma must be >= 0 and not all zero, got {alpha}, {beta}, {gamma}"
            )
        self.encoder = encoder
        self.estimator = estimator
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.kernel = kernel
        # None scores each batch against itself. A multi-process run with global negatives
        # sets `dimcli.distributed.GlobalNegatives` here, which scores against every process.
        self.scorer: Scorer | None = None
        c, m, _ = encoder.local_shape
        d = encoder.feature_dim
        if beta > 0:
            self.local_critic = MIBlock(c, mi_units, spatial=True)  # phi_L on C(x)
            self.local_y_critic = MIBlock(d, mi_units, spatial=False)  # phi_G on y
        if alpha > 0:
            self.map_critic = MIBlock(c * m * m, mi_units, spatial=False)  # flattened C(x)
            self.global_y_critic = MIBlock(d, mi_units, spatial=False)

    def forward(self, images: Tensor, discriminator: nn.Module | None = None) -> LossTerms:
        """Encode a normalised batch (N, 3, S, S) and compute every active term."""
        out = self.encoder(images)
        local_map, y = out["local"], out["y"]  # (N, C, M, M), (N, d)
        terms: dict[str, Tensor] = {}
        estimates: dict[str, Tensor] = {}
        total = torch.zeros((), device=y.device)

        if self.beta > 0:
            l_emb = self.local_critic(local_map)  # (N, u, M, M)
            g_emb = self.local_y_critic(y)  # (N, u)
            terms["local"], estimates["mi_local"] = self.score(l_emb, g_emb)
            total = total + self.beta * terms["local"]

        if self.alpha > 0:
            map_emb = self.map_critic(local_map.flatten(1))  # (N, C*M*M) -> (N, u)
            y_emb = self.global_y_critic(y)  # (N, u)
            # The global term is the local one with a single location (see `global_mi`).
            terms["global"], estimates["mi_global"] = self.score(map_emb[:, :, None, None], y_emb)
            total = total + self.alpha * terms["global"]

        if self.gamma > 0:
            if discriminator is None:
                raise ValueError("gamma > 0 needs the prior discriminator passed to forward()")
            terms["prior"] = prior_loss(discriminator, y)
            total = total + self.gamma * terms["prior"]

        return LossTerms(total=total, terms=terms, estimates=estimates, y=y)

    def loss_terms(
        self, images: Tensor, discriminator: nn.Module | None = None, *, gp_weight: float = 0.0
    ) -> dict[str, Tensor]:
        """Every term of one batch in one dict, for logging or a hand-written training loop.

        Keys: "total" (the encoder's weighted loss), "global", "local", "prior" (unweighted,
        for the active terms), "discriminator" (the discriminator's own loss on this batch,
        present when `discriminator` is given), "mi_global", "mi_local" (estimates, nats).
        The two players stay separate: "total" sends no gradient to the discriminator, and
        "discriminator" none to the encoder (y is detached), so each goes to its own optimiser.
        """
        out = self(images, discriminator)
        terms = {"total": out.total, **out.terms, **out.estimates}
        if discriminator is not None:
            assert out.y is not None, "forward() always returns y"
            terms["discriminator"] = discriminator_loss(discriminator, out.y, gp_weight)
        return terms

    def score(self, local: Tensor, global_: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, estimate) of local embeddings (N, u, H, W) against global ones (N, u)."""
        if self.scorer is not None:
            return self.scorer(local, global_, self.estimator)
        return local_mi(local, global_, self.estimator, kernel=self.kernel)
