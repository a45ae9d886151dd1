"""Image-folder data pipeline for `dim train` and `dim encode`.

The pipeline, in the order data flows through it:

1. `scan_images` walks a folder (recursively, in sorted order) and lists the image files.
2. `ImageFolder` decodes one file per item with `load_rgb` (always 3-channel 8-bit RGB) and
   shapes it with a `make_transform` transform into a uint8 tensor (3, S, S). A file that
   cannot be decoded does not crash the dataset: its sample is marked bad with a reason.
3. `collate` stacks the good samples into a `Batch` and carries the bad ones along in
   `Batch.skipped`, because DataLoader workers are separate processes and the batch is the
   only thing that reaches the main process.
4. In the main process a `SkipLog` warns once per bad file, writes `skipped.txt` into the run
   folder, or stops the run when the policy is "fail".
5. On the device, `normalize` turns uint8 batches into float32 ((x / 255 - mean) / std). Doing
   it there keeps worker-to-main transfers and pinned copies four times smaller.

File names are kept as `str`. On Linux a name whose bytes are not valid UTF-8 decodes with
surrogate escapes (what `os.fsdecode` gives); keys keep those escapes so the file can be
opened again, `printable` turns them into `\\xNN` for messages, and `SkipLog.write` writes the
original bytes back (errors="surrogateescape").
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from dimcli.errors import BadImageError, DimError, UsageError

__all__ = [
    "AUGMENTATIONS",
    "BAD_IMAGE_POLICIES",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "PAPER_MEAN",
    "PAPER_STD",
    "Batch",
    "ImageFolder",
    "ImageTransform",
    "Sample",
    "SkipLog",
    "auto_workers",
    "collate",
    "ensure_readable",
    "folder_label",
    "load_rgb",
    "make_loader",
    "make_transform",
    "normalize",
    "printable",
    "relative_key",
    "scan_images",
    "warn_stderr",
]

# Suffixes (lower case, with the dot) that `scan_images` picks up, compared case-insensitively.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# Largest image (width * height) that `load_rgb` decodes; bigger ones are reported as bad
# instead of exhausting memory. Same value as Pillow's default warning limit. Pillow's own
# hard limit (twice its `PIL.Image.MAX_IMAGE_PIXELS`) still applies above this.
MAX_IMAGE_PIXELS: int = 89_478_485

# Per-channel normalisation used in the paper for all datasets: x in [0, 1] -> [-1, 1].
PAPER_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
PAPER_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

# Values accepted by make_transform(augment=...) and SkipLog(policy=...).
AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "crop-flip")
BAD_IMAGE_POLICIES: tuple[str, ...] = ("skip", "fail")

# The crop-flip recipe enlarges the shorter side by this factor before a random crop
# (e.g. 64 -> 73, 32 -> 37), so crops move over about an eighth of the image.
_CROP_ENLARGE = 8 / 7

# Pillow modes that carry an alpha channel; they are composited on white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def warn_stderr(message: str) -> None:
    """Print one `warning: ...` line to stderr (the default warning sink)."""
    print(f"warning: {printable(message)}", file=sys.stderr)


def printable(text: str) -> str:
    """Return `text` with surrogate-escaped (non-UTF-8) bytes shown as `\\xNN`, safe to print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ==== scanning ====


def scan_images(root: Path | str, *, warn: Callable[[str], None] = warn_stderr) -> list[Path]:
    """List the image files under `root`, recursively, sorted by their `relative_key`.

    Hidden files and folders (name starts with '.') are ignored. Directory symlinks are
    followed, but each real directory is visited at most once, so a symlink loop ends the
    walk instead of hanging it (of two paths to the same folder, the one met first in sorted
    depth-first order is kept). Sub-folders that cannot be read are skipped with a warning.
    No file is opened: the scan only reads directory entries.

    Raises:
        DimError: `root` is missing, is a file, cannot be read, or holds no image file.
    """
    root = Path(root)
    return [root / key for key in _scan_keys(root, warn)]


def _scan_keys(root: Path, warn: Callable[[str], None]) -> list[str]:
    """Scan `root` and return the sorted relative keys of its image files."""
    shown = printable(str(root))
    if not root.exists():
        raise DimError(f"image folder {shown} does not exist; pass a folder that contains images")
    if not root.is_dir():
        raise DimError(
            f"{shown} is a file, not a folder; pass the folder of images that contains it"
        )

    root_stat = root.stat()
    seen_dirs = {(root_stat.st_dev, root_stat.st_ino)}
    keys: list[str] = []
    # Iterative depth-first walk: (folder on disk, its key prefix). No recursion limit on
    # deep trees, and DirEntry.is_dir/is_file come from the directory read (no stat per file).
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda entry: entry.name)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            if not prefix:
                raise DimError(
                    f"cannot read image folder {shown}: {reason}; fix its permissions "
                    "or pass another folder"
                ) from err
            warn(f"skipping unreadable folder {printable(prefix.rstrip('/'))}: {reason}")
            continue

        subfolders: list[tuple[str, str]] = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    # Identify the real folder, so each one is walked once whatever the
                    # symlinks pointing at it.
                    st = entry.stat()
                    ident = (st.st_dev, st.st_ino)
                    if ident not in seen_dirs:
                        seen_dirs.add(ident)
                        subfolders.append((entry.path, f"{prefix}{name}/"))
                elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    keys.append(prefix + name)
            except OSError:
                continue  # vanished or broken entry; nothing to decode there
        # Reversed so that the stack pops sub-folders in sorted order.
        stack.extend(reversed(subfolders))

    if not keys:
        suffixes = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DimError(
            f"no image files in {shown} (looked for {suffixes} in it and its sub-folders, "
            "hidden ones skipped); add images or pass another folder"
        )
    keys.sort()
    return keys


def relative_key(path: Path | str, root: Path | str) -> str:
    """Return `path` relative to `root` as a POSIX string ('cat/0001.jpg').

    A path outside `root` keeps its absolute POSIX form. Non-UTF-8 bytes stay surrogate
    escaped (see the module docstring).
    """
    path, root = Path(path), Path(root)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.absolute().as_posix()


def folder_label(key: str) -> str | None:
    """Return the first folder of a key ('cat/0001.jpg' -> 'cat'); None for a file in root."""
    head, sep, _ = key.partition("/")
    return head if sep else None


# ==== decoding ====


def load_rgb(path: Path | str, min_side: int | None = None) -> Image.Image:
    """Decode an image file into a fully loaded 8-bit RGB image.

    The EXIF orientation is applied; transparency (alpha, a transparent palette entry or
    colour key) is composited on white; 16-bit grayscale is scaled to 8 bit (round(v / 257)),
    16-bit colour keeps the high byte (Pillow's reading); animated images give their first
    frame; CMYK and other modes use Pillow's conversion to RGB.

    Args:
        path: the image file.
        min_side: when set, JPEGs may be decoded at 1/2, 1/4 or 1/8 scale as long as both
            sides stay at least this long (much faster for photos shrunk to small inputs).

    Raises:
        BadImageError: with a short reason: "empty file", "truncated image", "not an image",
            "image too large: WxH pixels", "permission denied", ...
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below; the image reads from it lazily)
    except PermissionError:
        raise BadImageError("permission denied") from None
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except IsADirectoryError:
        raise BadImageError("not a file") from None
    except OSError as err:
        raise BadImageError(f"cannot read file: {err.strerror or err}") from None

    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise BadImageError("empty file")
        try:
            image = _decode(file, min_side)
        except BadImageError:
            raise
        except PermissionError:
            raise BadImageError("permission denied") from None
        except UnidentifiedImageError:
            raise BadImageError("not an image") from None
        except Image.DecompressionBombError as err:
            raise BadImageError(_too_large_reason(file, err)) from None
        except EOFError:
            raise BadImageError("truncated image") from None
        except (OSError, SyntaxError, ValueError, IndexError, TypeError) as err:
            # Pillow reports damaged data with these; a cut-off file says "truncated".
            if "truncated" in str(err).lower():
                raise BadImageError("truncated image") from None
            raise BadImageError(f"corrupt image: {_first_line(err)}") from None
    return image


def _first_line(err: BaseException, limit: int = 80) -> str:
    """The first line of an error message, cut to `limit` characters."""
    lines = str(err).splitlines() or [type(err).__name__]
    return lines[0] if len(lines[0]) <= limit else lines[0][: limit - 3] + "..."


def _decode(file: BinaryIO, min_side: int | None) -> Image.Image:
    """Open, size-check, decode and convert one image; errors are mapped by the caller."""
    with warnings.catch_warnings():
        # The size is checked just below against MAX_IMAGE_PIXELS instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(file)
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImageError(f"image too large: {width}x{height} pixels")

    if min_side is not None and image.format == "JPEG":
        image.draft(None, (min_side, min_side))
    # Decode now: a truncated or corrupt file fails here, not later in a transform.
    # (ImageFile.LOAD_TRUNCATED_IMAGES must stay False for this to catch cut-off files.)
    image.load()

    # A damaged EXIF block only loses the orientation; the pixels are fine.
    with contextlib.suppress(OSError, SyntaxError, ValueError, KeyError, TypeError, IndexError):
        ImageOps.exif_transpose(image, in_place=True)
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    mode = image.mode
    if mode.startswith("I"):
        # 16-bit (or 32-bit int) grayscale: Pillow's convert("L") clips at 255, so scale the
        # 16-bit range down instead: round(v / 257) maps 0..65535 onto 0..255 exactly.
        # Limitation: "I" images are assumed to span 0..65535 (8-bit data stored as "I"
        # comes out dark, larger values clip); see docs/limitations.md
        values = np.asarray(image, dtype=np.float64)
        gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode not in _ALPHA_MODES and image.has_transparency_data:
        # A transparent palette entry or colour key (PNG tRNS): turn it into alpha first.
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        # Transparent pixels have no colour of their own; composite them on white.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    # Limitation: float ("F") images are clipped to 0..255 by Pillow's conversion, not
    # rescaled; see docs/limitations.md
    return image.convert("RGB")


def _too_large_reason(file: BinaryIO, err: Exception) -> str:
    """Reason for an image Pillow refused before giving its size: read the size unchecked."""
    size = _declared_size(file)
    if size is not None:
        return f"image too large: {size[0]}x{size[1]} pixels"
    match = re.search(r"\((\d+) pixels\)", str(err))
    return f"image too large: {match.group(1)} pixels" if match else "image too large"


def _declared_size(file: BinaryIO) -> tuple[int, int] | None:
    """The (width, height) a file's header declares, identified without Pillow's size limit."""
    try:
        file.seek(0)
        prefix = file.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            accepted = accept(prefix) if accept is not None else True
            if isinstance(accepted, str) or not accepted:
                continue
            file.seek(0)
            try:
                header = factory(file, "")
            except (SyntaxError, OSError, ValueError, IndexError, TypeError):
                continue
            return header.size
    except Exception:
        return None  # only used to word an error message; the file is bad either way
    return None


# ==== transforms ====


class ImageTransform:
    """Resize the shorter side, crop a square, maybe flip: image -> uint8 tensor (3, S, S).

    Callable on an RGB PIL image or a uint8 tensor (3, H, W). Random choices use torch's
    global RNG, which DataLoader seeds per worker from the loader's generator.
    """

    def __init__(self, image_size: int, augment: str = "none", train: bool = False) -> None:
        if image_size < 1:
            raise UsageError(f"image size must be at least 1 pixel, got {image_size}")
        if augment not in AUGMENTATIONS:
            raise UsageError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        self.image_size = image_size
        self.augment = augment
        self.train = train
        self.random_crop = train and augment == "crop-flip"
        self.random_flip = train and augment in ("flip", "crop-flip")
        # Length the shorter side is resized to before cropping; also the smallest side a
        # JPEG may be draft-decoded to without losing detail.
        self.resize_to = round(image_size * _CROP_ENLARGE) if self.random_crop else image_size

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, augment={self.augment!r}, "
            f"train={self.train})"
        )

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        x = self._tensor_crop(image) if isinstance(image, Tensor) else self._pil_crop(image)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def _pil_crop(self, image: Image.Image) -> Tensor:
        """Resize and crop a PIL image; returns a (3, S, S) uint8 view."""
        s = self.image_size
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        rw, rh = _shorter_side_to(w, h, self.resize_to)
        top, left = self._crop_origin(rh, rw)
        if (rw, rh) != (w, h):
            # Resample only the source region that lands in the crop. Output pixels sit where
            # they would after resize-then-crop, without building the whole resized image
            # (a 4000x3 strip would become 42667x32 first).
            sx, sy = w / rw, h / rh
            box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
            image = image.resize((s, s), Image.Resampling.BILINEAR, box=box)
        elif (w, h) != (s, s):
            image = image.crop((left, top, left + s, top + s))
        return _pil_to_chw(image)

    def _tensor_crop(self, image: Tensor) -> Tensor:
        """Resize and crop a uint8 (3, H, W) tensor; returns a (3, S, S) view."""
        s = self.image_size
        _, h, w = image.shape
        rw, rh = _shorter_side_to(w, h, self.resize_to)
        top, left = self._crop_origin(rh, rw)
        if (rw, rh) != (w, h):
            image = TF.resize(image, [rh, rw], antialias=True)  # (3, H, W) -> (3, rh, rw)
        return image[:, top : top + s, left : left + s]  # (3, rh, rw) -> (3, S, S)

    def _crop_origin(self, rh: int, rw: int) -> tuple[int, int]:
        """Top-left corner of the S x S crop inside the resized (rh, rw) image."""
        s = self.image_size
        if self.random_crop:
            top = int(torch.randint(0, rh - s + 1, ()))
            left = int(torch.randint(0, rw - s + 1, ()))
            return top, left
        return (rh - s) // 2, (rw - s) // 2


def _pil_to_chw(image: Image.Image) -> Tensor:
    """RGB PIL image -> contiguous uint8 tensor (3, H, W)."""
    # Pillow's array view is read-only; the transposed copy is the one copy we need anyway.
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())  # (H, W, 3) -> (3, H, W)


def _shorter_side_to(w: int, h: int, target: int) -> tuple[int, int]:
    """(width, height) after scaling so that the shorter side is `target`, aspect kept."""
    if w <= h:
        return target, max(target, round(h * target / w))
    return max(target, round(w * target / h)), target


def make_transform(image_size: int, augment: str = "none", train: bool = False) -> ImageTransform:
    """Build the per-image transform: RGB image -> uint8 tensor (3, image_size, image_size).

    - eval (any augment), and train with "none": shorter side to image_size (bilinear,
      antialiased), centre crop. An image whose shorter side already has that length is not
      resampled (CIFAR at 32 goes straight through).
    - "flip" (train): the same plus a random horizontal flip.
    - "crop-flip" (train): shorter side to round(image_size * 8 / 7), random image_size crop,
      random horizontal flip.

    Raises:
        UsageError: image_size < 1 or an unknown augment.
    """
    return ImageTransform(image_size, augment, train)


# ==== dataset and batches ====


@dataclass(frozen=True)
class Sample:
    """One dataset item: an image tensor, or None and the reason it could not be decoded."""

    index: int
    image: Tensor | None
    reason: str | None = None


@dataclass
class Batch:
    """Collated good samples plus the bad ones met while building the batch.

    Attributes:
        images: uint8 (B, 3, S, S); B may be 0 when every sample was bad.
        indices: int64 (B,), dataset index of each image.
        skipped: (dataset index, reason) of each sample that could not be decoded.
    """

    images: Tensor
    indices: Tensor
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def pin_memory(self) -> Batch:
        """Return a copy in pinned memory (called by DataLoader when pin_memory=True)."""
        return Batch(self.images.pin_memory(), self.indices.pin_memory(), list(self.skipped))


class ImageFolder(Dataset[Sample]):
    """Images of a folder tree as a dataset of `Sample`s; bad files give bad samples.

    Args:
        root: the folder; keys are paths relative to it.
        paths: the files to use (default: `scan_images(root)`).
        transform: RGB image -> uint8 tensor (3, S, S). Without one, items are the full
            image as uint8 (3, H, W), which only collates when all images share a size.
        warn: where scan warnings go (unreadable sub-folders).
    """

    def __init__(
        self,
        root: Path | str,
        paths: Sequence[Path | str] | None = None,
        transform: Callable[[Image.Image], Tensor] | None = None,
        *,
        warn: Callable[[str], None] = warn_stderr,
    ) -> None:
        self.root = Path(root)
        if paths is None:
            self.keys = _scan_keys(self.root, warn)
        else:
            self.keys = [relative_key(p, self.root) for p in paths]
        self.transform = transform
        # A transform that declares its resize target lets JPEGs decode at reduced scale.
        self._min_side: int | None = getattr(transform, "resize_to", None)

    def __len__(self) -> int:
        return len(self.keys)

    def path(self, index: int) -> Path:
        """The file of item `index`."""
        return self.root / self.keys[index]

    @property
    def labels(self) -> list[str | None]:
        """Class of each item from its first sub-folder (None for files directly in root)."""
        return [folder_label(key) for key in self.keys]

    def __getitem__(self, index: int) -> Sample:
        try:
            image = load_rgb(self.path(index), self._min_side)
        except BadImageError as err:
            return Sample(index, None, str(err))
        tensor = _pil_to_chw(image) if self.transform is None else self.transform(image)
        return Sample(index, tensor)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack the good samples into a `Batch`; list the bad ones in `Batch.skipped`."""
    good = [s for s in samples if s.image is not None]
    skipped = [(s.index, s.reason or "unknown error") for s in samples if s.image is None]
    if good:
        images = torch.stack([s.image for s in good if s.image is not None])  # (B, 3, S, S)
    else:
        images = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    indices = torch.tensor([s.index for s in good], dtype=torch.int64)
    return Batch(images, indices, skipped)


class SkipLog:
    """Main-process record of bad images: warn once per file and write `skipped.txt`, or fail.

    Args:
        policy: "skip" warns and goes on; "fail" raises on the first bad file.
        warn: receives one line per bad file (the first time it is seen).
    """

    FILE_NAME = "skipped.txt"

    def __init__(self, policy: str = "skip", warn: Callable[[str], None] = warn_stderr) -> None:
        if policy not in BAD_IMAGE_POLICIES:
            raise UsageError(f"on-bad-image policy must be 'skip' or 'fail', got {policy!r}")
        self.policy = policy
        self.warn = warn
        self._reasons: dict[str, str] = {}

    def record(self, key: str, reason: str) -> None:
        """Note one bad file.

        Raises:
            BadImageError: under the "fail" policy.
        """
        if self.policy == "fail":
            raise BadImageError(
                f"{printable(key)}: {reason}; fix or remove it, or use --on-bad-image skip"
            )
        if key in self._reasons:
            return  # already reported (an earlier epoch met it too)
        self._reasons[key] = reason
        self.warn(f"skipping {printable(key)}: {reason}")

    def record_batch(self, batch: Batch, keys: Sequence[str]) -> None:
        """Record every skipped sample of `batch`; `keys` are the dataset's keys."""
        for index, reason in batch.skipped:
            self.record(keys[index], reason)

    @property
    def entries(self) -> list[tuple[str, str]]:
        """(key, reason) of each bad file, sorted by key."""
        return sorted(self._reasons.items())

    def write(self, run_dir: Path | str) -> Path | None:
        """Write `skipped.txt` (path<TAB>reason per line) into `run_dir`; None if none skipped.

        Names are written with their original bytes (non-UTF-8 ones included); a backslash,
        tab, newline or carriage return inside a name is written as \\\\, \\t, \\n, \\r so
        that each line stays one record.
        """
        if not self._reasons:
            return None
        target = Path(run_dir) / self.FILE_NAME
        with open(target, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as out:
            for key, reason in self.entries:
                out.write(f"{_escape_field(key)}\t{_escape_field(reason)}\n")
        return target


def _escape_field(text: str) -> str:
    """Escape the characters that would break a tab-separated line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def ensure_readable(dataset: ImageFolder) -> None:
    """Check that at least one image of `dataset` decodes, trying files in order.

    Stops at the first readable file, so a healthy folder costs one decode.

    Raises:
        DimError: no file decodes; the message names the folder and the first failure.
    """
    first_failure = ""
    for index in range(len(dataset)):
        try:
            load_rgb(dataset.path(index), dataset._min_side)
            return
        except BadImageError as err:
            if not first_failure:
                first_failure = f"{printable(dataset.keys[index])}: {err}"
    raise DimError(
        f"no readable image in {printable(str(dataset.root))} ({len(dataset)} files tried, "
        f"first: {first_failure}); add JPEG/PNG images that open in an image viewer"
    )


# ==== device side ====


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Map uint8 images (..., C, H, W) to float32 (x / 255 - mean) / std, per channel.

    Runs on the images' device; channels_last input gives channels_last output.

    Raises:
        UsageError: mean or std do not have one value per channel, or a std is not positive.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    c = images.shape[-3]
    if len(mean) != c or len(std) != c:
        raise UsageError(
            f"mean and std need one value per channel ({c}), got {len(mean)} and {len(std)}"
        )
    if any(v <= 0 for v in std):
        raise UsageError(f"std values must be positive, got {tuple(std)}")

    # (x / 255 - m) / s == x / (255 s) + (-m / s): one fused kernel; dividing (rather than
    # multiplying by a reciprocal) keeps the end points exact, 0 -> -1 and 255 -> 1 for 0.5/0.5.
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    denom = (255.0 * s).to(images.device, torch.float32).view(c, 1, 1)
    shift = (-m / s).to(images.device, torch.float32).view(c, 1, 1)
    # .to keeps the memory format (channels_last stays channels_last)
    return torch.addcdiv(shift, images.to(torch.float32), denom)


# ==== loading ====


def auto_workers() -> int:
    """Default number of decoding worker processes: one per usable CPU, minus one, at most 8.

    One CPU is left for the main process (training step, logging). On a single-CPU machine
    this is 0, meaning images are decoded in the main process. On two CPUs it is 1.
    Eight workers decode small images far faster than a training step consumes them.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a worker from the seed torch gave it."""
    # torch already seeds each worker with base_seed + worker_id, where base_seed comes from
    # the loader's generator; the other RNGs follow it so any use of them is reproducible.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset[Sample],
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    workers: int,
    device: torch.device,
    seed: int,
    sampler: Sampler[int] | None = None,
) -> DataLoader[Sample]:
    """Build a reproducible DataLoader of `Batch`es over a dataset of `Sample`s.

    The shuffle order and every worker's random augmentations follow `seed`. Batches are
    pinned only for CUDA devices; workers persist across epochs and prefetch 4 batches each.

    Raises:
        UsageError: batch_size < 1 or workers < 0.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UsageError(f"workers must be 0 (decode in the main process) or more, got {workers}")
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler; the sampler decides the order")

    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=generator,
        worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
