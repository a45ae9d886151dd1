"""Bad input zoo: `dim train`, `dim encode` and `dim probe` on one folder of awkward files.

One folder mixes plain images with every awkward kind a real photo folder holds: odd modes
(CMYK, 16-bit, palette with transparency, animated GIF), EXIF rotation, extreme shapes
(1x1, 2000x3), odd file names (non-UTF-8 bytes, spaces), a symlink loop, and files that
cannot be decoded (empty, truncated, text, decompression bombs, no read permission).
The commands run through the real CLI; every good file must be used, every bad one skipped
and listed with its reason, and `--on-bad-image fail` must stop with one line naming it.
"""

from __future__ import annotations

import csv
import io
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from dimcli import data
from dimcli.cli import app
from dimcli.features import index_path, read_features

# Tiny settings: the whole module runs in seconds on a shared 2-core CPU.
TINY = ["--mi-units", "16", "--feature-dim", "8", "--workers", "0", "--device", "cpu"]
# 24 files in all: a single epoch of 3 batches of 8 (train drops no remainder) meets each once.
TRAIN_BATCH = 8
# File names whose bytes are not valid UTF-8 (they arrive as surrogate escapes).
NON_UTF8 = b"caf\xe9 \xff.png"
NON_UTF8_EMPTY = b"vide \xe9t\xe9.jpg"


# ==== writing the zoo ====


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels (height, width, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge RGB image (valid CRCs, no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _truncated(fmt: str) -> bytes:
    """The first half of an encoded image."""
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 48)).save(buffer, format=fmt)
    whole = buffer.getvalue()
    return whole[: len(whole) // 2]


def _cmyk(path: Path) -> None:
    Image.fromarray(_noise(40, 30, 1)).convert("CMYK").save(path, quality=90)


def _gray16(path: Path) -> None:
    ramp = np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 54  # 0..64746
    Image.fromarray(ramp).save(path)


def _palette_alpha(path: Path) -> None:
    Image.fromarray(_noise(40, 30, 2)).convert("P").save(path, transparency=0)


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(_noise(40, 30, 3)).save(path, exif=exif)


def _plain(seed: int) -> Callable[[Path], None]:
    return lambda path: Image.fromarray(_noise(36, 32, seed)).save(path)


# Decodable files, by key (path relative to the folder). Their first folder is their class.
GOOD: dict[str, Callable[[Path], object]] = {
    **{f"class0/plain{i}.png": _plain(i) for i in range(4)},
    **{f"class1/plain{i}.png": _plain(i) for i in range(4, 8)},
    "class0/cmyk.jpg": _cmyk,
    "class0/gray16.png": _gray16,
    "class0/palette-alpha.png": _palette_alpha,
    "class0/animated.gif": _animated_gif,
    "class1/exif-rotated.jpg": _exif_rotated,
    "class1/one-pixel.png": lambda p: Image.fromarray(_noise(1, 1, 4)).save(p),
    "class1/wide.png": lambda p: Image.fromarray(_noise(2000, 3, 5)).save(p),
    "class1/" + os.fsdecode(NON_UTF8): _plain(8),
    "class1/summer holiday.png": _plain(10),
}

# Undecodable files: key -> (writer, the reason every list and message must give).
BAD: dict[str, tuple[Callable[[Path], object], str]] = {
    os.fsdecode(NON_UTF8_EMPTY): (lambda p: p.write_bytes(b""), "empty file"),
    "notes.jpg": (lambda p: p.write_text("a shopping list, not a photo\n"), "not an image"),
    "class0/cut.jpg": (lambda p: p.write_bytes(_truncated("JPEG")), "truncated image"),
    "class0/bomb.png": (
        lambda p: p.write_bytes(_bomb_png(100_000, 90_000)),
        "image too large: 100000x90000 pixels",
    ),
    # Above dimcli's limit but below Pillow's own hard limit: dimcli's check must catch it.
    "class1/large.png": (
        lambda p: p.write_bytes(_bomb_png(10_000, 9_000)),
        "image too large: 10000x9000 pixels",
    ),
    "class1/cut.png": (lambda p: p.write_bytes(_truncated("PNG")), "truncated image"),
    "class1/locked.png": (_plain(9), "permission denied"),
}
LOCKED = "class1/locked.png"
BAD_REASONS = {key: reason for key, (_, reason) in BAD.items()}


@dataclass(frozen=True)
class Zoo:
    root: Path
    good: list[str]  # keys, in the order dimcli lists them (sorted)
    bad: dict[str, str]  # key -> reason


def _write(root: Path, key: str, writer: Callable[[Path], object]) -> None:
    path = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(key))))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path)


def _check_awkward(root: Path) -> None:
    """The awkward files really are what their names claim."""
    modes = {"cmyk.jpg": "CMYK", "gray16.png": "I;16", "palette-alpha.png": "P"}
    for name, mode in modes.items():
        with Image.open(root / "class0" / name) as image:
            assert image.mode == mode, name
    with Image.open(root / "class0/palette-alpha.png") as image:
        assert "transparency" in image.info
    with Image.open(root / "class0/animated.gif") as image:
        assert getattr(image, "n_frames", 1) == 2
    with Image.open(root / "class1/exif-rotated.jpg") as image:
        assert image.getexif()[0x0112] == 6


def _still_readable(path: Path) -> bool:
    """Whether this process can open `path` despite its mode bits."""
    try:
        path.open("rb").close()
    except PermissionError:
        return False
    return True


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Small convolutions; on a shared 2-core machine a second intra-op thread only spins.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    """The folder of good and bad files; the locked file stays unreadable while it is in use."""
    if sys.platform != "linux":
        pytest.skip("non-UTF-8 file names and permission bits need Linux")
    root = tmp_path_factory.mktemp("zoo") / "images"
    for key, writer in GOOD.items():
        _write(root, key, writer)
    for key, (writer, _) in BAD.items():
        _write(root, key, writer)
    (root / "class0" / "loop").symlink_to(".", target_is_directory=True)  # class0/loop/loop/...
    (root / "class1" / "up").symlink_to("..", target_is_directory=True)  # back to the root
    assert len(GOOD) + len(BAD) == 3 * TRAIN_BATCH, "one epoch must meet every file"
    _check_awkward(root)

    locked = root / LOCKED
    locked.chmod(0)
    with pytest.MonkeyPatch.context() as mp:
        if _still_readable(locked):
            # Root (or CAP_DAC_OVERRIDE) reads files whatever their mode: deny the read where
            # dimcli opens it instead, which is what the kernel would do for anyone else.
            def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(file, (str, os.PathLike)) and Path(file) == locked:
                    raise PermissionError(13, "Permission denied", os.fspath(file))
                return open(file, *args, **kwargs)

            mp.setattr(data, "open", guarded_open, raising=False)
        yield Zoo(root, sorted(GOOD), dict(BAD_REASONS))
        locked.chmod(0o644)


# ==== running the CLI ====


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _assert_clean(result: Result) -> None:
    """Exit code 0 and nothing that looks like a crash."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def _assert_one_line_error(result: Result) -> str:
    """A non-zero exit with a single `error: ...` line on stderr; returns the message."""
    assert isinstance(result.exception, SystemExit), result.output  # not a crash
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def _read_skipped(path: Path) -> dict[str, str]:
    """A skipped list (path<TAB>reason per line, original bytes) as {key: reason}."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    return dict(line.split("\t") for line in text.splitlines())


@dataclass(frozen=True)
class Trained:
    run_dir: Path
    result: Result
    decoded: set[str]  # keys the training loader decoded


@pytest.fixture(scope="module")
def trained(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One epoch of `dim train` on the zoo, recording which files the loader decoded."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    decoded: set[str] = set()
    real_getitem = data.ImageFolder.__getitem__

    def spy(self: data.ImageFolder, index: int) -> data.Sample:
        sample = real_getitem(self, index)
        if sample.image is not None:
            decoded.add(self.keys[index])
        return sample

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data.ImageFolder, "__getitem__", spy)
        result = _invoke("train", zoo.root, "--out", run_dir, "--batch-size", TRAIN_BATCH,
                         "--epochs", 1, "--precision", "fp32", "--no-report", *TINY)  # fmt: skip
    return Trained(run_dir, result, decoded)


@pytest.fixture(scope="module")
def encoded(zoo: Zoo, trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dim encode` of the zoo with the trained model; returns the feature file."""
    _assert_clean(trained.result)
    out = tmp_path_factory.mktemp("encode") / "feats.npy"
    result = _invoke("encode", zoo.root, "-o", out, "--model", trained.run_dir,
                     "--batch-size", 4, "--workers", 0, "--device", "cpu")  # fmt: skip
    _assert_clean(result)
    summary = result.stdout.strip().splitlines()[-1]
    skipped_list = out.with_name("feats.skipped.txt")
    assert summary.startswith(f"wrote {len(zoo.good)} rows x 8 dims to {out}"), summary
    assert f"; {len(zoo.bad)} skipped (listed in {skipped_list})" in summary
    return out


# ==== train ====


def test_train_uses_every_good_image_and_lists_every_bad_one(zoo: Zoo, trained: Trained) -> None:
    _assert_clean(trained.result)
    assert trained.decoded == set(zoo.good)
    assert (trained.run_dir / "encoder.safetensors").is_file()
    assert _read_skipped(trained.run_dir / "skipped.txt") == zoo.bad
    for key, reason in zoo.bad.items():
        assert f"skipping {data.printable(key)}: {reason}" in trained.result.output
    assert "fewer than 2 readable images" not in trained.result.output  # no batch was lost


# ==== encode ====


def test_encode_writes_one_row_per_good_image_and_lists_the_bad(zoo: Zoo, encoded: Path) -> None:
    features, keys = read_features(encoded)
    assert keys == zoo.good
    assert features.shape == (len(zoo.good), 8) and np.isfinite(features).all()
    # The index keeps the file name's original bytes, so the file can be found again.
    assert b"class1/" + NON_UTF8 in index_path(encoded).read_bytes()
    assert all((zoo.root / key).is_file() for key in keys)
    skipped_list = encoded.with_name("feats.skipped.txt")
    assert _read_skipped(skipped_list) == zoo.bad
    assert NON_UTF8_EMPTY + b"\tempty file\n" in skipped_list.read_bytes()


# ==== probe ====


def _write_labels(path: Path, keys: list[str]) -> Path:
    """labels.csv labelling each key by its class folder (bytes kept as they are)."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([key, data.folder_label(key) or "none"] for key in keys)
    return path


@pytest.mark.parametrize("labels", ["csv of the good images", "csv of every file", "folders"])
def test_probe_matches_every_encoded_image(
    zoo: Zoo, encoded: Path, tmp_path: Path, labels: str
) -> None:
    _, keys = read_features(encoded)
    if labels == "folders":
        source: list[object] = ["--labels-from-folders"]
        n_labels = n_matched = len(zoo.good)
    else:
        listed = keys if labels == "csv of the good images" else keys + sorted(zoo.bad)
        source = ["--labels", _write_labels(tmp_path / "labels.csv", listed)]
        n_labels, n_matched = len(listed), len(zoo.good)

    # The smaller class has 8 images; the default 0.2 holds out 2 of each for testing.
    result = _invoke("probe", "--features", encoded, *source)

    _assert_clean(result)
    assert (
        f"labels: {n_matched} of {n_labels} labelled paths matched feature rows "
        f"({n_labels - n_matched} labels without a row, 0 rows without a label); "
        "2 classes, 8 dims"
    ) in result.stdout


# ==== --on-bad-image fail ====


def test_encode_fail_names_the_first_bad_file_and_writes_nothing(
    zoo: Zoo, trained: Trained, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "feats.npy"
    out.parent.mkdir()
    result = _invoke("encode", zoo.root, "-o", out, "--model", trained.run_dir,
                     "--batch-size", 4, "--workers", 0, "--device", "cpu",
                     "--on-bad-image", "fail")  # fmt: skip

    message = _assert_one_line_error(result)
    first = min(zoo.bad)  # rows follow the sorted paths
    assert message == f"{first}: {zoo.bad[first]}; fix or remove it, or use --on-bad-image skip"
    assert os.listdir(out.parent) == []  # no output, no index, no partial files


def test_train_fail_names_a_bad_file_and_writes_no_model(zoo: Zoo, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _invoke("train", zoo.root, "--out", run_dir, "--batch-size", TRAIN_BATCH,
                     "--epochs", 1, "--precision", "fp32", "--no-report",
                     "--on-bad-image", "fail", *TINY)  # fmt: skip

    message = _assert_one_line_error(result)
    match = re.fullmatch(r"(.+): (.+); fix or remove it, or use --on-bad-image skip", message)
    assert match is not None, message
    key, reason = match.groups()
    shown = {data.printable(k): r for k, r in zoo.bad.items()}  # non-UTF-8 bytes shown as \xNN
    assert shown.get(key) == reason, message  # the file met first in the shuffled order
    for name in ("encoder.safetensors", "checkpoint", "skipped.txt"):
        assert not (run_dir / name).exists(), name
