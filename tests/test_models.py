"""Encoders, critics, prior matching and the weighted DIM objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dimcli.errors import UsageError
from dimcli.models import (
    ENCODERS,
    PRESETS,
    DIMModel,
    MIBlock,
    PriorDiscriminator,
    build_encoder,
    discriminator_loss,
    prior_loss,
)

# Encoders at the sizes the tests build them: (name, image_size, conv, fc, local).
EXPECTED = [
    ("conv32", 32, (256, 4, 4), (1024,), (128, 8, 8)),
    ("alex64", 64, (192, 7, 7), (4096,), (384, 15, 15)),
    ("resnet18", 32, (512, 4, 4), (512,), (256, 8, 8)),
    ("resnet50", 32, (2048, 4, 4), (2048,), (1024, 8, 8)),
    ("resnet18", 96, (512, 3, 3), (512,), (256, 6, 6)),
]


@pytest.mark.parametrize(("name", "size", "conv", "fc", "local"), EXPECTED)
def test_encoder_output_shapes(name: str, size: int, conv: tuple, fc: tuple, local: tuple) -> None:
    enc = build_encoder(name, image_size=size, feature_dim=16)
    out = enc(torch.randn(2, 3, size, size))
    assert tuple(out["conv"].shape) == (2, *conv)
    assert tuple(out["fc"].shape) == (2, *fc)
    assert tuple(out["y"].shape) == (2, 16)
    assert tuple(out["local"].shape) == (2, *local)
    assert enc.layer_dims == {"conv": conv, "fc": fc, "y": (16,)}
    assert enc.local_shape == local


def test_registry_holds_the_four_encoders() -> None:
    assert set(ENCODERS) == {"conv32", "alex64", "resnet18", "resnet50"}


@pytest.mark.parametrize("name", ["conv32", "alex64", "resnet18"])
def test_config_rebuilds_the_same_architecture(name: str) -> None:
    enc = build_encoder(name, image_size=64 if name != "conv32" else 32, feature_dim=8)
    again = build_encoder(**enc.config())
    shapes = {k: v.shape for k, v in enc.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes


def test_bad_encoder_arguments_name_the_fix() -> None:
    with pytest.raises(UsageError, match="choose one of conv32, alex64, resnet18, resnet50"):
        build_encoder("vgg")
    with pytest.raises(UsageError, match="encoder conv32 takes image size exactly 32, got 64"):
        build_encoder("conv32", image_size=64)
    with pytest.raises(UsageError, match="multiple of 32"):
        build_encoder("resnet18", image_size=50)
    with pytest.raises(UsageError, match="feature dimension"):
        build_encoder("conv32", feature_dim=0)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", ["conv32", "alex64", "resnet18"])
def test_every_parameter_gets_a_gradient(preset: str, name: str) -> None:
    torch.manual_seed(0)
    size = {"conv32": 32, "alex64": 64, "resnet18": 32}[name]
    enc = build_encoder(name, image_size=size, feature_dim=8)
    alpha, beta, gamma = PRESETS[preset]
    model = DIMModel(enc, alpha=alpha, beta=beta, gamma=gamma, mi_units=16, kernel="reference")
    disc = PriorDiscriminator(8)
    out = model(torch.randn(4, 3, size, size), disc)
    assert torch.isfinite(out.total)
    out.total.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    # The encoder's step must leave the discriminator untouched: a true min-max.
    assert all(p.grad is None for p in disc.parameters())


def test_weighted_total_is_alpha_global_plus_beta_local_plus_gamma_prior() -> None:
    torch.manual_seed(1)
    model = DIMModel(
        build_encoder("conv32", feature_dim=8),
        alpha=0.5,
        beta=0.1,
        gamma=0.2,
        mi_units=16,
        kernel="reference",
    )
    out = model(torch.randn(4, 3, 32, 32), PriorDiscriminator(8))
    t = out.terms
    expected = 0.5 * t["global"] + 0.1 * t["local"] + 0.2 * t["prior"]
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(out.estimates) == {"mi_global", "mi_local"}


def test_loss_terms_returns_every_term_and_keeps_the_players_apart() -> None:
    torch.manual_seed(2)
    model = DIMModel(
        build_encoder("conv32", feature_dim=8), alpha=0.5, beta=0.1, gamma=0.2, mi_units=16
    )
    disc = PriorDiscriminator(8)
    images = torch.randn(4, 3, 32, 32)
    terms = model.loss_terms(images, disc)
    keys = {"total", "global", "local", "prior", "discriminator", "mi_global", "mi_local"}
    assert set(terms) == keys
    expected = 0.5 * terms["global"] + 0.1 * terms["local"] + 0.2 * terms["prior"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)

    # The encoder's loss reaches no discriminator weight...
    terms["total"].backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())
    # ...and the discriminator's loss no encoder weight.
    model.zero_grad(set_to_none=True)
    terms["discriminator"].backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in disc.parameters())

    # Without a discriminator (gamma = 0) there is no prior or discriminator term.
    plain = DIMModel(build_encoder("conv32"), beta=1.0, gamma=0.0, mi_units=8)
    assert set(plain.loss_terms(torch.randn(2, 3, 32, 32))) == {"total", "local", "mi_local"}


def test_zero_weights_build_no_critic() -> None:
    model = DIMModel(build_encoder("conv32"), alpha=0.0, beta=1.0, gamma=0.0, mi_units=8)
    assert not hasattr(model, "map_critic")
    out = model(torch.randn(2, 3, 32, 32))
    assert set(out.terms) == {"local"}


def test_objective_rejects_bad_weights_and_missing_discriminator() -> None:
    enc = build_encoder("conv32")
    with pytest.raises(ValueError, match="not all zero"):
        DIMModel(enc, alpha=0, beta=0, gamma=0)
    with pytest.raises(ValueError, match="discriminator"):
        DIMModel(enc, beta=1, gamma=0.1, mi_units=8)(torch.randn(2, 3, 32, 32))


def test_mi_block_normalises_each_location_over_channels() -> None:
    torch.manual_seed(2)
    block = MIBlock(5, 12, spatial=True)
    out = block(torch.randn(3, 5, 4, 4))
    assert out.shape == (3, 12, 4, 4)
    # LayerNorm without learned change yet: zero mean, unit variance across channels.
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(3, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.var(dim=1, unbiased=False), torch.ones(3, 4, 4), atol=1e-3, rtol=0
    )


def test_mi_block_spatial_equals_vector_block_at_each_location() -> None:
    torch.manual_seed(3)
    spatial, flat = MIBlock(5, 7, spatial=True).eval(), MIBlock(5, 7, spatial=False).eval()
    with torch.no_grad():  # copy the 1x1 conv weights into the linear layers
        for (_, a), (_, b) in zip(spatial.named_parameters(), flat.named_parameters(), strict=True):
            b.copy_(a.reshape(b.shape))
    x = torch.randn(2, 5, 3, 3)
    y_map = spatial(x)  # (2, 7, 3, 3)
    y_vec = flat(x.permute(0, 2, 3, 1).reshape(-1, 5)).reshape(2, 3, 3, 7).permute(0, 3, 1, 2)
    torch.testing.assert_close(y_map, y_vec, rtol=1e-5, atol=1e-5)


def test_prior_terms_match_their_formulas() -> None:
    torch.manual_seed(4)
    disc = PriorDiscriminator(6)
    y = torch.randn(10, 6)
    expected = F.softplus(-disc(torch.sigmoid(y))).mean()
    assert prior_loss(disc, y).item() == pytest.approx(expected.item(), rel=1e-6)
    torch.manual_seed(5)
    d_loss = discriminator_loss(disc, y)
    torch.manual_seed(5)
    real = torch.rand(10, 6)
    ref = F.softplus(-disc(real)).mean() + F.softplus(disc(torch.sigmoid(y))).mean()
    assert d_loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_discriminator_loss_falls_when_trained_on_fixed_inputs() -> None:
    torch.manual_seed(6)
    disc = PriorDiscriminator(4)
    y = torch.randn(64, 4) * 3  # sigmoid(y) piles up near 0 and 1: easy to tell from uniform
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = discriminator_loss(disc, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1


def test_gradient_penalty_adds_a_positive_term() -> None:
    torch.manual_seed(7)
    disc, y = PriorDiscriminator(4), torch.randn(16, 4)
    torch.manual_seed(8)
    plain = discriminator_loss(disc, y)
    torch.manual_seed(8)
    penalised = discriminator_loss(disc, y, gp_weight=10.0)
    assert penalised.item() > plain.item()
    penalised.backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_prior_loss_sends_gradient_to_y_only() -> None:
    disc = PriorDiscriminator(3)
    y = torch.randn(5, 3, requires_grad=True)
    prior_loss(disc, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
