"""Encoder model files: safetensors weights whose metadata rebuilds the model.

A model file holds the encoder's weights (never the critics or the discriminator) and one
metadata entry, "dimcli", a JSON document:

    {"format": "dimcli.encoder", "format_version": 1, "dimcli_version": "0.1.0",
     "torch_version": "...", "encoder": {"name": "conv32", "image_size": 32, "feature_dim": 64},
     "layers": {"conv": [256, 4, 4], "fc": [1024], "y": [64]},
     "preprocessing": {"image_size": 32, "mean": [...], "std": [...], "resize": "..."},
     "training": {...resolved training settings...}}

Loading never executes code from the file: the header is read and checked by hand (bounded
size, offsets inside the file) before safetensors touches the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dimcli import __version__
from dimcli.data import _to_rgb, load_rgb, make_transform, normalize
from dimcli.errors import BadImageError, ModelFileError
from dimcli.models.encoders import ENCODERS, LAYERS, Encoder, build_encoder

FORMAT = "dimcli.encoder"
FORMAT_VERSION = 1
MODEL_FILENAME = "encoder.safetensors"
_MAX_HEADER_BYTES = 64 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

# How a conv feature map becomes a row: "none" flattens (C*H*W), "avg" averages over
# locations (C).
POOLS: tuple[str, ...] = ("none", "avg")

# What `LoadedEncoder.preprocess` and `.encode` take: one image or a sequence of them, each a
# PIL image, an image file path, or a uint8 tensor (3, H, W); or a uint8 batch (N, 3, H, W).
OneImage: TypeAlias = "Image.Image | str | os.PathLike[str] | Tensor"
Images: TypeAlias = "OneImage | Sequence[OneImage]"


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """A model file, or a run folder holding `encoder.safetensors` (e.g. runs/latest)."""
    p = Path(path)
    if p.is_dir():
        candidate = p / MODEL_FILENAME
        if not candidate.is_file():
            raise ModelFileError(
                f"{p} is a folder without {MODEL_FILENAME}; point --model at a run folder of "
                "`dim train` or at a .safetensors model file"
            )
        return candidate
    if not p.exists():
        hint = " (train one first with `dim train IMAGES`)" if p.name == "latest" else ""
        raise ModelFileError(f"model {p} not found{hint}; pass --model RUN_FOLDER_OR_FILE")
    return p


def save_encoder(
    encoder: Encoder,
    path: str | os.PathLike[str],
    *,
    preprocessing: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> None:
    """Write the encoder's weights and rebuild metadata to `path`, atomically."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dimcli_version": __version__,
        "torch_version": torch.__version__,
        "encoder": encoder.config(),
        "layers": {name: list(encoder.layer_dims[name]) for name in LAYERS},
        "preprocessing": preprocessing,
        "training": training or {},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(
        Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"dimcli": json.dumps(meta)})
    )


def atomic_write(path: Path, write: Any, *, suffix: str = ".partial") -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync, then rename over `path`.

    `suffix` ends the temporary name, for writers that insist on an extension (torch.export).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp (and some writers) create 0600; model files are shared, so follow the umask.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a model file's header without loading any weights.

    Raises:
        ModelFileError: not a safetensors file, truncated, damaged or foreign metadata,
            or a newer format version than this dimcli reads.
    """
    p = Path(path)
    header = _read_header(p)
    raw = header.get("__metadata__", {}).get("dimcli")
    if raw is None:
        raise ModelFileError(
            f"{p} is a safetensors file but not a dimcli encoder (no 'dimcli' metadata); "
            "use a model file written by `dim train` or `dim export`"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(
            f"{p}: the dimcli metadata is not valid JSON; the file is damaged"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(
            f"{p}: metadata does not describe a dimcli encoder (format {FORMAT!r})"
        )
    check_format_version(p, meta, FORMAT_VERSION, "model")
    enc = meta.get("encoder")
    if not isinstance(enc, dict) or enc.get("name") not in ENCODERS:
        name = enc.get("name") if isinstance(enc, dict) else None
        raise ModelFileError(
            f"{p}: unknown encoder {name!r} in metadata; this dimcli knows {', '.join(ENCODERS)}"
        )
    for key in ("preprocessing", "layers"):
        if not isinstance(meta.get(key), dict):
            raise ModelFileError(f"{p}: metadata lacks {key!r}; the file is damaged")
    return meta


@dataclass
class LoadedEncoder:
    """An encoder rebuilt from a model file, in eval mode, with its preprocessing."""

    module: Encoder
    metadata: dict[str, Any]
    path: Path

    @property
    def image_size(self) -> int:
        return int(self.metadata["preprocessing"]["image_size"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.metadata["preprocessing"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.metadata["preprocessing"]["std"])

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, S, S) in [0, 255] -> the float input the encoder was trained on."""
        # The same function as training uses, so encode sees bit-identical inputs.
        return normalize(images, self.mean, self.std)

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are."""
        return next(self.module.parameters()).device

    def feature_dim(self, layer: str = "y", pool: str = "none") -> int:
        """Width of the rows `encode` gives for `layer` and `pool`."""
        _check_layer_pool(layer, pool)
        shape = self.module.layer_dims[layer]
        if pool == "avg":
            return int(shape[0])  # (C, H, W) -> C
        n = 1
        for size in shape:
            n *= int(size)
        return n

    def preprocess(self, images: Images) -> Tensor:
        """Images -> the normalised float batch (N, 3, S, S) the encoder takes, on its device.

        Each image goes through the same steps as in `dim encode`: files are decoded by
        `dimcli.data.load_rgb`; PIL images get their EXIF orientation applied and are
        converted to RGB by the same rules (transparency on white); then the shorter side is
        resized to S and the centre S x S crop kept (the eval transform), and the result is
        normalised with the model's mean and std. A uint8 tensor that is already S x S is
        used as is; other sizes are resized with torchvision's tensor resize, which is close
        to, but not bit-identical with, Pillow's.

        Raises:
            BadImageError: an image file that cannot be decoded (the message names it).
            TypeError, ValueError: an input of the wrong type, dtype or shape.
        """
        return self.normalize(self._uint8_batch(images).to(self.device))

    def features(self, x: Tensor, layer: str = "y", pool: str = "none") -> Tensor:
        """Normalised float batch (N, 3, S, S) -> float32 features (N, D) at `layer`.

        `layer` is "y", "fc" or "conv"; a conv map is flattened (pool "none") or averaged
        over locations (pool "avg"). Runs under whatever grad and autocast mode is active.
        """
        _check_layer_pool(layer, pool)
        out = self.module(x)[layer]
        if pool == "avg":
            out = out.mean(dim=(2, 3))  # (N, C, H, W) -> (N, C)
        return out.flatten(1).float()  # (N, ...) -> (N, D)

    @torch.no_grad()
    def encode(self, images: Images, layer: str = "y", pool: str = "none") -> Tensor:
        """Features of images, float32 (N, D), on the encoder's device; the in-memory `dim encode`.

        Takes what `preprocess` takes (PIL images, file paths, uint8 tensors); rows come in
        input order. For files, the rows equal those `dim encode` writes for them.

        Example::

            import dimcli
            from PIL import Image, ImageOps

            enc = dimcli.load_encoder("runs/latest")
            y = enc.encode([Image.open("cat.jpg"), "dog.png"])  # (2, 64)
            conv = enc.encode("cat.jpg", layer="conv", pool="avg")  # (1, channels)
            x = enc.preprocess(Image.open("cat.jpg"))  # (1, 3, S, S), to call enc.module(x)
        """
        return self.features(self.preprocess(images), layer, pool)

    def _uint8_batch(self, images: Images) -> Tensor:
        """Images -> uint8 (N, 3, S, S) on the CPU, each shaped by the eval transform."""
        s = self.image_size
        if isinstance(images, Tensor) and images.dim() == 4:
            _check_uint8(images)
            _, _, h, w = images.shape  # (N, 3, H, W)
            if (h, w) == (s, s):
                return images.cpu()
            items: Sequence[OneImage] = list(images.cpu())
        elif isinstance(images, (Image.Image, str, os.PathLike, Tensor)):
            items = [images]
        else:
            items = list(images)
        if not items:
            raise ValueError("no images given; pass at least one image")

        transform = make_transform(s, "none", train=False)
        batch = []
        for item in items:
            if isinstance(item, Tensor):
                _check_uint8(item)
                batch.append(transform(item.cpu()))
            elif isinstance(item, Image.Image):
                batch.append(transform(_pil_rgb(item)))
            elif isinstance(item, (str, os.PathLike)):
                try:
                    image = load_rgb(os.fspath(item), transform.resize_to)
                except BadImageError as err:
                    raise BadImageError(f"{os.fsdecode(item)}: {err}") from None
                batch.append(transform(image))
            else:
                raise TypeError(
                    f"cannot encode a {type(item).__name__}; pass PIL images, image file "
                    "paths or uint8 tensors (3, H, W)"
                )
        return torch.stack(batch)  # N x (3, S, S) -> (N, 3, S, S)


def _check_layer_pool(layer: str, pool: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    if pool == "avg" and layer != "conv":
        raise ValueError(f"pool 'avg' applies to layer 'conv' only, got layer {layer!r}")


def _pil_rgb(image: Image.Image) -> Image.Image:
    """An in-memory image as `load_rgb` would give it from a file: upright, 8-bit RGB."""
    # A damaged EXIF block only loses the orientation, as in load_rgb.
    with contextlib.suppress(OSError, SyntaxError, ValueError, KeyError, TypeError, IndexError):
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(
            f"image tensors must be uint8 in [0, 255], got {images.dtype}; convert float images "
            "in [0, 1] with (x * 255).round().to(torch.uint8)"
        )
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(
            f"image tensors must be (3, H, W) or (N, 3, H, W) RGB, got shape {tuple(images.shape)}"
        )


def load_encoder(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> LoadedEncoder:
    """Rebuild an encoder from a model file or run folder, weights checked against the metadata.

    Raises:
        ModelFileError: see `read_metadata`; also weights whose names or shapes do not match
            the declared architecture.
    """
    p = resolve_model_path(path)
    meta = read_metadata(p)
    enc = meta["encoder"]
    try:
        encoder = build_encoder(
            enc["name"],
            image_size=enc.get("image_size"),
            feature_dim=int(enc.get("feature_dim", 64)),
        )
    except Exception as err:
        raise ModelFileError(f"{p}: cannot rebuild encoder from metadata {enc}: {err}") from None
    try:
        weights = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{p}: cannot read weights ({err}); the file is damaged") from None
    _check_weights(p, encoder, weights)
    encoder.load_state_dict(weights)
    encoder.eval().to(device)
    return LoadedEncoder(module=encoder, metadata=meta, path=p)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_weights(path: Path, module: nn.Module, weights: dict[str, Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    mismatched = [
        f"{k} {found[k]} vs {expected[k]}"
        for k in sorted(set(expected) & set(found))
        if found[k] != expected[k]
    ]
    if mismatched:
        problems.append(f"shape mismatch {_some(mismatched)}")
    bad_dtype = [
        k
        for k, v in weights.items()
        if not (v.is_floating_point() or k.endswith("num_batches_tracked"))
    ]
    if bad_dtype:
        problems.append(f"non-float weights {_some(bad_dtype)}")
    if problems:
        raise ModelFileError(
            f"{path}: weights do not match the declared architecture: {'; '.join(problems)}"
        )


def _some(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_format_version(path: Path, meta: Mapping[str, Any], supported: int, kind: str) -> None:
    """Refuse `meta` without an integer "format_version", or with one newer than `supported`.

    Raises:
        ModelFileError: naming the file, and the upgrade for a newer format.
    """
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(
            f"{path}: {kind} metadata has no integer format_version; the file is damaged"
        )
    if version > supported:
        raise ModelFileError(
            f"{path} uses {kind} format version {version}, newer than this dimcli reads "
            f"({supported}); upgrade dimcli (pip install -U dimcli)"
        )


def _read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header with explicit bounds checks (no data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ModelFileError(
                    f"{path} is too short to be a safetensors model file ({size} bytes)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise ModelFileError(
                    f"{path} is not a safetensors model file (or it is truncated): header length "
                    f"{header_len} does not fit in {size} bytes"
                )
            raw = fh.read(header_len)
    except OSError as err:
        raise ModelFileError(f"cannot read model file {path}: {err.strerror or err}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(
            f"{path} is not a safetensors model file: its header is not JSON"
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a safetensors model file: its header is not an object")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise ModelFileError(
                    f"{path}: safetensors metadata is not an object; the file is damaged"
                )
            continue
        try:
            start, end = (int(v) for v in info["data_offsets"])
            shape = [int(v) for v in info["shape"]]
            itemsize = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(
                f"{path}: tensor {name!r} has a malformed header entry; the file is damaged"
            ) from None
        numel = 1
        for dim in shape:
            numel *= dim
        if not (0 <= start <= end <= data_len) or end - start != numel * itemsize:
            raise ModelFileError(
                f"{path}: tensor {name!r} claims bytes {start}..{end} but the file holds "
                f"{data_len}; the file is truncated or damaged"
            )
    return header
