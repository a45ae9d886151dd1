"""Encoders, critics, the prior discriminator and the DIM objective that ties them together."""

from dimcli.models.critics import MIBlock
from dimcli.models.dim import PRESETS, DIMModel, LossTerms
from dimcli.models.encoders import (
    ENCODERS,
    LAYERS,
    Encoder,
    build_encoder,
    check_image_size,
    default_image_size,
    encoder_names,
)
from dimcli.models.prior import PriorDiscriminator, discriminator_loss, prior_loss

__all__ = [
    "ENCODERS",
    "LAYERS",
    "PRESETS",
    "DIMModel",
    "Encoder",
    "LossTerms",
    "MIBlock",
    "PriorDiscriminator",
    "build_encoder",
    "check_image_size",
    "default_image_size",
    "discriminator_loss",
    "encoder_names",
    "prior_loss",
]
