"""Adversarial prior matching: push sigmoid(y) towards uniform on [0, 1]^d.

A discriminator D tells prior samples (real) from sigmoid(y) (fake). It is a min-max:
D minimises `discriminator_loss`, the encoder minimises `prior_loss` (the non-saturating
generator term), each with its own optimiser and step. The encoder term evaluates D with
detached parameters, so the encoder's backward pass leaves no gradient in D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


class PriorDiscriminator(nn.Module):
    """D: linear(d -> 1000), ReLU, linear(1000 -> 200), ReLU, linear(200 -> 1)."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(feature_dim, 1000),
            nn.ReLU(inplace=True),
            nn.Linear(1000, 200),
            nn.ReLU(inplace=True),
            nn.Linear(200, 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).squeeze(-1)  # (N, d) -> (N,)


def prior_loss(disc: nn.Module, y: Tensor) -> Tensor:
    """Encoder's term: mean sp(-D(sigmoid(y))), gradients to y only."""
    frozen = {name: p.detach() for name, p in disc.named_parameters()}
    logits = functional_call(disc, frozen, (torch.sigmoid(y.float()),))
    return F.softplus(-logits).mean()


def discriminator_loss(disc: nn.Module, y: Tensor, gp_weight: float = 0.0) -> Tensor:
    """D's term: mean sp(-D(u)) + mean sp(D(sigmoid(y))), u ~ U[0, 1]^d; y is detached.

    With `gp_weight` > 0 adds gp_weight * E ||grad_z D(z)||^2 on real and fake samples
    (a zero-centred gradient penalty that keeps D smooth).
    """
    fake = torch.sigmoid(y.detach().float())
    real = torch.rand_like(fake)
    if gp_weight > 0:
        real.requires_grad_(True)
        fake.requires_grad_(True)
    real_logits, fake_logits = disc(real), disc(fake)
    loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if gp_weight > 0:
        grads = torch.autograd.grad(
            real_logits.sum() + fake_logits.sum(), (real, fake), create_graph=True
        )
        penalty = sum(g.pow(2).sum(dim=1).mean() for g in grads)
        loss = loss + gp_weight * penalty
    return loss
