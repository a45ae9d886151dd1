"""Encoders E = f o C, with a registry by name.

Every encoder maps a normalised image batch (N, 3, S, S) to a dict of named outputs:

    "local": C(x), the (N, C, M, M) map that the local objective scores against y
    "conv":  the last convolutional map (probed, flattened)
    "fc":    the hidden fully connected layer (probed)
    "y":     the representation, (N, feature_dim)

`build_encoder(**encoder.config())` rebuilds the same architecture, which is how model files
restore an encoder without the original command-line flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from dimcli.errors import UsageError

LAYERS: tuple[str, ...] = ("conv", "fc", "y")


class Encoder(nn.Module):
    """Base class: subclasses build `self.blocks` and implement `_forward`."""

    name: str = ""

    def __init__(self, image_size: int, feature_dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.feature_dim = feature_dim
        self.layer_dims: dict[str, tuple[int, ...]] = {}
        self.local_shape: tuple[int, int, int] = (0, 0, 0)

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture with `build_encoder`."""
        return {"name": self.name, "image_size": self.image_size, "feature_dim": self.feature_dim}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self._forward(x)

    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _record_shapes(self) -> None:
        """Fill `layer_dims` and `local_shape` from one dry forward pass of a single image."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self._forward(torch.zeros(1, 3, self.image_size, self.image_size))
        self.train(was_training)
        self.layer_dims = {name: tuple(out[name].shape[1:]) for name in LAYERS}
        c, m1, m2 = out["local"].shape[1:]
        self.local_shape = (c, m1, m2)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, pad: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, pad, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _linear_bn_relu(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)
    )


class Conv32(Encoder):
    """The paper's 32x32 encoder (CIFAR): three 4x4 stride-2 convs, fc 1024, y."""

    name = "conv32"

    def __init__(self, image_size: int = 32, feature_dim: int = 64) -> None:
        super().__init__(image_size, feature_dim)
        self.conv1 = _conv_bn_relu(3, 64, 4, 2, 1)  # 32 -> 16
        self.conv2 = _conv_bn_relu(64, 128, 4, 2, 1)  # 16 -> 8: local map, 8x8x128
        self.conv3 = _conv_bn_relu(128, 256, 4, 2, 1)  # 8 -> 4: conv layer, 4x4x256
        self.fc = _linear_bn_relu(256 * 4 * 4, 1024)
        self.head = nn.Linear(1024, feature_dim)
        self._record_shapes()

    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        local = self.conv2(self.conv1(x))  # (N, 128, 8, 8)
        conv = self.conv3(local)  # (N, 256, 4, 4)
        fc = self.fc(conv.flatten(1))  # (N, 4096) -> (N, 1024)
        return {"local": local, "conv": conv, "fc": fc, "y": self.head(fc)}


class Alex64(Encoder):
    """The paper's AlexNet-like 64x64 encoder (Tiny ImageNet, STL-10 crops)."""

    name = "alex64"

    def __init__(self, image_size: int = 64, feature_dim: int = 64) -> None:
        super().__init__(image_size, feature_dim)
        pool = nn.MaxPool2d(3, 2)
        self.stem = nn.Sequential(
            _conv_bn_relu(3, 96, 3, 1, 1), pool, _conv_bn_relu(96, 192, 3, 1, 1), pool
        )  # 64 -> 31 -> 15
        self.conv3 = _conv_bn_relu(192, 384, 3, 1, 1)  # local map, 15x15x384
        self.conv45 = nn.Sequential(
            _conv_bn_relu(384, 384, 3, 1, 1), _conv_bn_relu(384, 192, 3, 1, 1), pool
        )  # 15 -> 7: conv layer, 7x7x192
        self.fc = nn.Sequential(_linear_bn_relu(192 * 7 * 7, 4096), _linear_bn_relu(4096, 4096))
        self.head = nn.Linear(4096, feature_dim)
        self._record_shapes()

    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        local = self.conv3(self.stem(x))  # (N, 384, 15, 15)
        conv = self.conv45(local)  # (N, 192, 7, 7)
        fc = self.fc(conv.flatten(1))  # (N, 9408) -> (N, 4096)
        return {"local": local, "conv": conv, "fc": fc, "y": self.head(fc)}


class _TorchvisionResNet(Encoder):
    """A torchvision ResNet, randomly initialised; local map from layer3, conv from layer4.

    For inputs of 64 pixels or less the stem is the usual small-image adaptation (3x3 stride-1
    first conv, no max-pool), so a 32x32 image gives an 8x8 local map like `conv32`.
    "fc" is the globally pooled layer4 output (512 or 2048 wide).
    """

    arch = ""

    def __init__(self, image_size: int = 224, feature_dim: int = 64) -> None:
        super().__init__(image_size, feature_dim)
        net = getattr(torchvision.models, self.arch)(weights=None)
        if image_size <= 64:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        width = net.fc.in_features
        self.head = nn.Linear(width, feature_dim)
        self._record_shapes()

    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        local = self.layer3(self.stem(x))  # (N, 256 or 1024, S/4, S/4) for small inputs
        conv = self.layer4(local)  # (N, 512 or 2048, S/8, S/8)
        fc = conv.mean(dim=(2, 3))  # global average pool -> (N, 512 or 2048)
        return {"local": local, "conv": conv, "fc": fc, "y": self.head(fc)}


class ResNet18(_TorchvisionResNet):
    name = "resnet18"
    arch = "resnet18"


class ResNet50(_TorchvisionResNet):
    name = "resnet50"
    arch = "resnet50"


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one registered encoder and which input sizes it takes."""

    builder: Callable[..., Encoder]
    default_size: int
    sizes: str  # human-readable rule, for error messages
    accepts: Callable[[int], bool]
    description: str


ENCODERS: dict[str, EncoderSpec] = {
    "conv32": EncoderSpec(Conv32, 32, "exactly 32", lambda s: s == 32, "the paper's 32x32 encoder"),
    "alex64": EncoderSpec(Alex64, 64, "exactly 64", lambda s: s == 64, "the paper's 64x64 encoder"),
    "resnet18": EncoderSpec(
        ResNet18,
        224,
        "a multiple of 32, at least 32",
        lambda s: s >= 32 and s % 32 == 0,
        "torchvision ResNet-18, random init",
    ),
    "resnet50": EncoderSpec(
        ResNet50,
        224,
        "a multiple of 32, at least 32",
        lambda s: s >= 32 and s % 32 == 0,
        "torchvision ResNet-50, random init",
    ),
}


def encoder_names() -> list[str]:
    """Registered encoder names."""
    return list(ENCODERS)


def default_image_size(name: str) -> int:
    """The input size an encoder is built for when none is given."""
    return _spec(name).default_size


def check_image_size(name: str, image_size: int) -> None:
    """Raise UsageError when `name` cannot take `image_size` x `image_size` inputs."""
    spec = _spec(name)
    if not spec.accepts(image_size):
        raise UsageError(
            f"encoder {name} takes image size {spec.sizes}, got {image_size}; "
            f"use --image-size {spec.default_size} or another --encoder"
        )


def build_encoder(name: str, *, image_size: int | None = None, feature_dim: int = 64) -> Encoder:
    """Build a registered encoder with random weights.

    Raises:
        UsageError: unknown name, an input size it cannot take, or feature_dim < 1.
    """
    spec = _spec(name)
    size = spec.default_size if image_size is None else int(image_size)
    check_image_size(name, size)
    if feature_dim < 1:
        raise UsageError(f"feature dimension must be at least 1, got {feature_dim}")
    return spec.builder(image_size=size, feature_dim=feature_dim)


def _spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise UsageError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}") from None
