"""Tests for dimcli.data: scanning, decoding, transforms, batches, skip log, loaders."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dimcli import data
from dimcli.errors import BadImageError, DimError, UsageError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ==== helpers that write test images ====


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels (height, width, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_rgb(path: Path, width: int = 20, height: int = 16, seed: int = 0, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(width, height, seed)).save(path, **kw)
    return path


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: signature, IHDR, one IDAT of `rows` (filter bytes included), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int = 100_000, height: int = 90_000) -> bytes:
    """A tiny PNG whose header declares a huge RGB image (valid CRCs, no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def truncated(path: Path, fmt: str) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 48)).save(buffer, format=fmt)
    whole = buffer.getvalue()
    path.write_bytes(whole[: len(whole) // 2])
    return path


# Bad files and the reason each one must give.
BAD_FILES: dict[str, tuple[Callable[[Path], object], str]] = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "cut.jpg": (lambda p: truncated(p, "JPEG"), "truncated image"),
    "cut.png": (lambda p: truncated(p, "PNG"), "truncated image"),
    "text.jpg": (lambda p: p.write_text("not a picture, just text\n"), "not an image"),
    "bomb.png": (lambda p: p.write_bytes(bomb_png()), "image too large: 100000x90000 pixels"),
}


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """A folder of good and bad images; returns (root, key -> expected reason or None)."""
    root = tmp_path / "images"
    expected: dict[str, str | None] = {}
    for i in range(6):
        key = f"good/{i:02d}.png"
        save_rgb(root / key, 20 + i, 16, seed=i)
        expected[key] = None
    save_rgb(root / "good/photo.jpg", 40, 30)
    expected["good/photo.jpg"] = None
    for name, (write, reason) in BAD_FILES.items():
        path = root / "bad" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        expected[f"bad/{name}"] = reason
    return root, expected


# ==== scanning ====


def test_scan_finds_all_extensions_any_case_sorted_and_skips_hidden(tmp_path: Path) -> None:
    wanted = [
        "A/x.JPEG",
        "A/y.webp",
        "a.jpg",
        "b/c/deep.TIF",
        "b/d.tiff",
        "e.bmp",
        "f.GIF",
        "g.Png",
        "h i.png",
    ]
    for key in wanted:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")  # the scan must not open files
    for ignored in [".hidden.png", ".cache/z.png", "b/.thumbs/t.jpg", "notes.txt", "jpg"]:
        (tmp_path / ignored).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ignored).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image

    paths = data.scan_images(tmp_path)

    assert [data.relative_key(p, tmp_path) for p in paths] == sorted(wanted)
    assert all(p.is_file() for p in paths)


def test_scan_follows_symlinks_once_and_survives_a_loop(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a/b/img.png")
    save_rgb(tmp_path / "c/other.png")
    (tmp_path / "a/b/loop").symlink_to(tmp_path / "a")  # a/b/loop -> a -> b -> loop ...
    (tmp_path / "a/up").symlink_to(tmp_path)  # back to the root itself
    (tmp_path / "link_to_c").symlink_to(tmp_path / "c")  # same folder as c, seen second

    keys = [data.relative_key(p, tmp_path) for p in data.scan_images(tmp_path)]

    # c/ sorts before link_to_c/, so the folder is listed once, under c/.
    assert keys == ["a/b/img.png", "c/other.png"]


def test_scan_skips_unreadable_subfolder_with_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_rgb(tmp_path / "ok/1.png")
    save_rgb(tmp_path / "locked/2.png")
    real_scandir = os.scandir
    locked = os.fspath(tmp_path / "locked")

    def scandir(path: Any) -> Any:
        if os.fspath(path) == locked:  # root can read anything, so simulate the denial
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(data.os, "scandir", scandir)
    warnings: list[str] = []

    paths = data.scan_images(tmp_path, warn=warnings.append)

    assert [data.relative_key(p, tmp_path) for p in paths] == ["ok/1.png"]
    assert warnings == ["skipping unreadable folder locked: Permission denied"]


@pytest.mark.skipif(IS_ROOT, reason="root reads folders whatever their mode; simulated above")
def test_scan_skips_really_unreadable_subfolder(tmp_path: Path) -> None:
    save_rgb(tmp_path / "ok/1.png")
    save_rgb(tmp_path / "locked/2.png")
    (tmp_path / "locked").chmod(0)
    try:
        warnings: list[str] = []
        paths = data.scan_images(tmp_path, warn=warnings.append)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert [p.name for p in paths] == ["1.png"]
    assert len(warnings) == 1 and "locked" in warnings[0]


def test_scan_errors_name_the_problem_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DimError, match=r"does not exist; pass a folder that contains images"):
        data.scan_images(tmp_path / "missing")

    file = save_rgb(tmp_path / "one.png")
    with pytest.raises(DimError, match=r"is a file, not a folder; pass the folder of images"):
        data.scan_images(file)

    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    save_rgb(empty / ".hidden/x.png")
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DimError, match=r"no image files in .*empty.*; add images or pass another"):
        data.scan_images(empty)

    def denied(path: Any) -> Any:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(data.os, "scandir", denied)
    with pytest.raises(DimError, match=r"cannot read image folder .*: Permission denied; fix its"):
        data.scan_images(tmp_path)


def test_non_utf8_and_space_names_scan_load_and_print(tmp_path: Path) -> None:
    raw_name = b"caf\xe9 \xff.png"  # Latin-1 bytes: not valid UTF-8
    buffer = io.BytesIO()
    Image.fromarray(noise(8, 8)).save(buffer, format="PNG")
    with open(os.fsencode(tmp_path) + b"/" + raw_name, "wb") as out:
        out.write(buffer.getvalue())
    save_rgb(tmp_path / "with space.png", 8, 8)

    paths = data.scan_images(tmp_path)
    keys = [data.relative_key(p, tmp_path) for p in paths]

    assert keys == sorted(["with space.png", os.fsdecode(raw_name)])
    assert "caf\udce9 \udcff.png" in keys  # surrogate escapes keep the original bytes
    assert data.printable("caf\udce9 \udcff.png") == "caf\\xe9 \\xff.png"
    for path in paths:
        assert data.load_rgb(path).size == (8, 8)


def test_relative_key_and_folder_label(tmp_path: Path) -> None:
    assert data.relative_key(tmp_path / "cat" / "0001.jpg", tmp_path) == "cat/0001.jpg"
    assert data.relative_key(tmp_path / "x.png", tmp_path) == "x.png"
    outside = tmp_path.parent / "elsewhere.png"
    assert data.relative_key(outside, tmp_path) == outside.as_posix()

    assert data.folder_label("cat/0001.jpg") == "cat"
    assert data.folder_label("train/cat/0001.jpg") == "train"
    assert data.folder_label("0001.jpg") is None


# ==== decoding: bad files ====


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_rgb_reports_bad_files(tmp_path: Path, name: str) -> None:
    write, reason = BAD_FILES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(BadImageError) as caught:
        data.load_rgb(path)
    assert str(caught.value) == reason


def test_load_rgb_respects_the_module_pixel_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_rgb(tmp_path / "big.png", 30, 20)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 599)
    with pytest.raises(BadImageError, match=r"^image too large: 30x20 pixels$"):
        data.load_rgb(path)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 600)
    assert data.load_rgb(path).size == (30, 20)


def test_load_rgb_permission_denied_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_rgb(tmp_path / "secret.png")
    real_open = builtins.open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(BadImageError, match=r"^permission denied$"):
        data.load_rgb(path)


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode; simulated above")
def test_load_rgb_permission_denied_for_real(tmp_path: Path) -> None:
    path = save_rgb(tmp_path / "secret.png")
    path.chmod(0)
    with pytest.raises(BadImageError, match=r"^permission denied$"):
        data.load_rgb(path)


def test_load_rgb_rejects_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match=r"^file not found$"):
        data.load_rgb(tmp_path / "gone.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(BadImageError, match=r"^not a file$"):
        data.load_rgb(tmp_path / "dir.png")


# ==== decoding: every mode becomes RGB ====


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB", f"expected RGB, got {image.mode}"
    return np.asarray(image)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 128, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I"), "the test file must really be 16-bit"

    out = pixels(data.load_rgb(path))

    # Reference: round(v / 255 * 65535 ...) written out: v * 255 / 65535 rounded.
    expected = [round(int(v) * 255 / 65535) for v in values[0]]
    assert expected == [0, 0, 1, 128, 255]
    assert out[0, :, 0].tolist() == expected
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16_bit_rgb_png_is_scaled(tmp_path: Path) -> None:
    samples = [0, 0, 0, 32896, 32896, 32896, 65535, 65535, 65535, 65535, 0, 4112]
    rows = b"\x00" + struct.pack(">12H", *samples)  # one row, filter byte 0
    path = tmp_path / "rgb16.png"
    path.write_bytes(raw_png(4, 1, 16, 2, rows))

    out = pixels(data.load_rgb(path))

    # 16 -> 8 bit keeps the high byte, within one level of round(v / 257).
    expected = np.array([round(v / 257) for v in samples]).reshape(1, 4, 3)
    assert out.tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255], [255, 0, 16]]]
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_palette_png_with_transparency_composites_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((0, 0), 0)  # transparent index
    image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    assert pixels(data.load_rgb(path)).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_rgba_and_la_composite_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 200, 0))  # fully transparent: white
    rgba.save(tmp_path / "rgba.png")
    la = Image.new("LA", (1, 1), (0, 128))  # black at half opacity over white
    la.save(tmp_path / "la.png")

    assert pixels(data.load_rgb(tmp_path / "rgba.png")).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    # Reference: 255 * (1 - a) + 0 * a with a = 128 / 255.
    gray = pixels(data.load_rgb(tmp_path / "la.png"))[0, 0]
    assert np.abs(gray.astype(int) - round(255 * (1 - 128 / 255))).max() <= 1


def test_rgb_colour_key_composites_on_white(tmp_path: Path) -> None:
    image = Image.new("RGB", (2, 1), (0, 255, 0))
    image.putpixel((1, 0), (9, 8, 7))
    image.save(tmp_path / "key.png", transparency=(0, 255, 0))  # green means transparent

    assert pixels(data.load_rgb(tmp_path / "key.png")).tolist() == [[[255, 255, 255], [9, 8, 7]]]


def test_corrupt_image_reason_is_one_short_line(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(noise(16, 16)).save(buffer, format="PNG")
    whole = bytearray(buffer.getvalue())
    whole[60:80] = b"\x00" * 20  # damage the compressed pixels, keep the length
    (tmp_path / "damaged.png").write_bytes(bytes(whole))
    with pytest.raises(BadImageError) as caught:
        data.load_rgb(tmp_path / "damaged.png")
    reason = str(caught.value)
    assert reason.startswith(("corrupt image: ", "truncated image")), reason
    assert "\n" not in reason and len(reason) <= 100


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "I", "YCbCr"])
def test_other_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    source = Image.fromarray(noise(12, 10)).convert(mode)
    path = tmp_path / ("img.tif" if mode in ("I", "YCbCr") else "img.png")
    if mode == "CMYK":
        path = tmp_path / "img.jpg"
    source.save(path)

    out = data.load_rgb(path)

    assert out.mode == "RGB" and out.size == (12, 10)


def test_cmyk_jpeg_colours_survive(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (16, 16), (200, 40, 90))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"

    out = pixels(data.load_rgb(tmp_path / "cmyk.jpg"))

    assert np.abs(out.astype(int) - np.array([200, 40, 90])).max() <= 8


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 2

    out = pixels(data.load_rgb(path))

    assert out.shape == (4, 6, 3) and (out == [255, 0, 0]).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high, black
    stored[:10, :10] = (255, 0, 0)  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    out = data.load_rgb(path)

    assert out.size == (20, 40)  # width and height swap
    shown = pixels(out)
    # Clockwise rotation takes the top-left corner to the top-right.
    assert shown[5, 15, 0] > 200 and shown[5, 15, 1] < 60
    assert shown[5, 4, 0] < 60


def test_jpeg_draft_keeps_at_least_min_side(tmp_path: Path) -> None:
    path = save_rgb(tmp_path / "large.jpg", 400, 300)
    out = data.load_rgb(path, min_side=64)
    assert min(out.size) >= 64 and out.size[0] < 400  # decoded at reduced scale


# ==== transforms ====


@pytest.mark.parametrize("augment", ["none", "flip", "crop-flip"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(32, 32), (50, 40), (40, 50), (1, 1), (4000, 3)])
def test_transform_output_shape(augment: str, train: bool, size: tuple[int, int]) -> None:
    transform = data.make_transform(24, augment, train)
    image = Image.fromarray(noise(*size))

    out = transform(image)

    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8 and out.is_contiguous()


def test_transform_tensor_input_shape() -> None:
    tensor = torch.from_numpy(noise(50, 40).transpose(2, 0, 1).copy())  # (3, 40, 50)
    for augment in ("none", "flip", "crop-flip"):
        out = data.make_transform(24, augment, train=True)(tensor)
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_transform_fast_path_keeps_pixels_exactly() -> None:
    array = noise(32, 32)
    expected = torch.from_numpy(array).permute(2, 0, 1)
    for transform in (data.make_transform(32), data.make_transform(32, "crop-flip")):
        assert torch.equal(transform(Image.fromarray(array)), expected)
        assert torch.equal(transform(expected.clone()), expected)


def test_transform_centre_crop_without_resize() -> None:
    array = noise(48, 32)  # shorter side already 32: crop the middle 32 columns
    out = data.make_transform(32)(Image.fromarray(array))
    assert torch.equal(out, torch.from_numpy(array[:, 8:40]).permute(2, 0, 1))


def test_transform_box_resize_matches_resize_then_crop() -> None:
    image = Image.fromarray(noise(64, 48))
    out = data.make_transform(24)(image)

    # Reference: shorter side 48 -> 24 (so 64 -> 32), then the centre 24 columns.
    full = np.asarray(image.resize((32, 24), Image.Resampling.BILINEAR))
    expected = torch.from_numpy(full[:, 4:28].copy()).permute(2, 0, 1)
    assert (out.int() - expected.int()).abs().max() <= 1


def test_eval_transform_is_the_same_for_every_augment() -> None:
    image = Image.fromarray(noise(50, 40))
    outputs = [data.make_transform(24, a, train=False)(image) for a in data.AUGMENTATIONS]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])


def test_flip_gives_image_or_its_mirror_and_both_occur() -> None:
    array = noise(24, 24)
    plain = torch.from_numpy(array).permute(2, 0, 1)
    transform = data.make_transform(24, "flip", train=True)
    torch.manual_seed(0)
    outputs = [transform(Image.fromarray(array)) for _ in range(20)]
    flipped = [torch.equal(out, plain.flip(-1)) for out in outputs]
    assert all(f or torch.equal(out, plain) for f, out in zip(flipped, outputs, strict=True))
    assert any(flipped) and not all(flipped)


def test_random_transforms_follow_torch_seed() -> None:
    image = Image.fromarray(noise(50, 40))
    transform = data.make_transform(24, "crop-flip", train=True)
    assert transform.resize_to == round(24 * 8 / 7)

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [transform(image) for _ in range(8)]

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert len({bytes(out.numpy()) for out in first}) > 1  # crops really vary


def test_transform_rejects_bad_settings() -> None:
    with pytest.raises(UsageError, match=r"augment must be one of none, flip, crop-flip, got 'x'"):
        data.make_transform(32, "x")
    with pytest.raises(UsageError, match=r"image size must be at least 1 pixel, got 0"):
        data.make_transform(0)


# ==== dataset, collate, loader ====


def test_dataset_marks_bad_samples(mixed_folder: tuple[Path, dict[str, str | None]]) -> None:
    root, expected = mixed_folder
    dataset = data.ImageFolder(root, transform=data.make_transform(16))

    assert dataset.keys == sorted(expected)
    assert dataset.labels == [key.split("/")[0] for key in dataset.keys]
    for i, key in enumerate(dataset.keys):
        sample = dataset[i]
        assert sample.index == i
        assert sample.reason == expected[key], key
        if expected[key] is None:
            assert sample.image is not None and sample.image.shape == (3, 16, 16)
            assert sample.image.dtype == torch.uint8
        else:
            assert sample.image is None


def test_dataset_with_explicit_paths_and_no_transform(tmp_path: Path) -> None:
    a = save_rgb(tmp_path / "x/a.png", 7, 5)
    b = save_rgb(tmp_path / "b.png", 7, 5)
    dataset = data.ImageFolder(tmp_path, paths=[b, a])
    assert dataset.keys == ["b.png", "x/a.png"]
    assert dataset.path(1) == a
    sample = dataset[1]
    assert sample.image is not None and sample.image.shape == (3, 5, 7)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_batches_carry_skipped_files(
    mixed_folder: tuple[Path, dict[str, str | None]], workers: int
) -> None:
    root, expected = mixed_folder
    dataset = data.ImageFolder(root, transform=data.make_transform(16, "flip", train=True))
    loader = data.make_loader(
        dataset,
        4,
        shuffle=True,
        drop_last=False,
        workers=workers,
        device=torch.device("cpu"),
        seed=0,
    )

    good: list[int] = []
    skipped: dict[str, str] = {}
    for batch in loader:
        assert isinstance(batch, data.Batch)
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 16, 16)
        assert batch.images.shape[0] == len(batch) == batch.indices.shape[0]
        good += batch.indices.tolist()
        skipped.update({dataset.keys[i]: reason for i, reason in batch.skipped})

    assert sorted(dataset.keys[i] for i in good) == sorted(k for k, r in expected.items() if not r)
    assert skipped == {k: r for k, r in expected.items() if r is not None}


def test_collate_of_only_bad_samples_is_an_empty_batch() -> None:
    batch = data.collate([data.Sample(3, None, "empty file"), data.Sample(5, None, "not an image")])
    assert len(batch) == 0 and batch.images.shape[0] == 0 and batch.images.dtype == torch.uint8
    assert batch.skipped == [(3, "empty file"), (5, "not an image")]


def test_batch_pickles_and_pins() -> None:
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    batch = data.collate([data.Sample(0, image), data.Sample(1, None, "empty file")])
    copy = pickle.loads(pickle.dumps(batch))
    assert torch.equal(copy.images, batch.images) and copy.skipped == [(1, "empty file")]
    assert copy.indices.dtype == torch.int64 and copy.indices.tolist() == [0]
    if not torch.cuda.is_available():
        pytest.skip("pinning memory needs CUDA")
    pinned = batch.pin_memory()
    assert pinned.images.is_pinned() and pinned.indices.is_pinned()
    assert pinned.skipped == batch.skipped


def test_loader_pins_batches_for_cuda(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("pinning memory needs CUDA")
    (tmp_path / "bad.png").write_bytes(b"")
    save_rgb(tmp_path / "good.png", 8, 8)
    dataset = data.ImageFolder(tmp_path)
    loader = data.make_loader(
        dataset, 2, shuffle=False, drop_last=False, workers=1, device=torch.device("cuda"), seed=0
    )
    batch = next(iter(loader))
    assert loader.pin_memory and batch.images.is_pinned()
    assert batch.skipped == [(0, "empty file")] and batch.indices.tolist() == [1]


def test_make_loader_settings_and_seeded_order(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png", 8, 8)
    dataset = data.ImageFolder(tmp_path, paths=[tmp_path / "a.png"] * 40)

    def order(seed: int) -> list[int]:
        loader = data.make_loader(
            dataset,
            8,
            shuffle=True,
            drop_last=True,
            workers=0,
            device=torch.device("cpu"),
            seed=seed,
        )
        assert loader.pin_memory is False and loader.drop_last is True
        return [i for batch in loader for i in batch.indices.tolist()]

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == list(range(40))


def test_make_loader_uses_persistent_seeded_workers(tmp_path: Path) -> None:
    for i in range(6):
        save_rgb(tmp_path / f"{i}.png", 40, 30, seed=i)
    dataset = data.ImageFolder(tmp_path, transform=data.make_transform(16, "crop-flip", True))

    def images() -> torch.Tensor:
        loader = data.make_loader(
            dataset,
            6,
            shuffle=False,
            drop_last=False,
            workers=1,
            device=torch.device("cpu"),
            seed=7,
        )
        assert loader.persistent_workers and loader.prefetch_factor == 4
        return next(iter(loader)).images

    assert torch.equal(images(), images())  # the same seed gives the same random crops


def test_make_loader_rejects_bad_arguments(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    dataset = data.ImageFolder(tmp_path)
    cpu = torch.device("cpu")
    common: dict[str, Any] = {"drop_last": False, "device": cpu, "seed": 0}
    with pytest.raises(UsageError, match=r"batch size must be at least 1, got 0"):
        data.make_loader(dataset, 0, shuffle=False, workers=0, **common)
    with pytest.raises(UsageError, match=r"workers must be 0 .* or more, got -1"):
        data.make_loader(dataset, 2, shuffle=False, workers=-1, **common)
    sampler = torch.utils.data.SequentialSampler(dataset)
    with pytest.raises(ValueError, match=r"pass shuffle=False with a sampler"):
        data.make_loader(dataset, 2, shuffle=True, workers=0, sampler=sampler, **common)


@pytest.mark.parametrize(("cpus", "expected"), [(1, 0), (2, 1), (4, 3), (9, 8), (64, 8)])
def test_auto_workers(monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int) -> None:
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert data.auto_workers() == expected


# ==== skip log and readability check ====


def test_skip_log_warns_once_and_writes_sorted_file(tmp_path: Path) -> None:
    lines: list[str] = []
    log = data.SkipLog("skip", warn=lines.append)
    assert log.write(tmp_path) is None  # nothing skipped, no file

    for _epoch in range(2):
        log.record("z/b.jpg", "truncated image")
        log.record("a.png", "empty file")
    log.record("odd\tname\udcff.png", "not an image")

    assert lines == [
        "skipping z/b.jpg: truncated image",
        "skipping a.png: empty file",
        "skipping odd\tname\\xff.png: not an image",
    ]
    assert log.entries == [
        ("a.png", "empty file"),
        ("odd\tname\udcff.png", "not an image"),
        ("z/b.jpg", "truncated image"),
    ]
    written = log.write(tmp_path)
    assert written == tmp_path / "skipped.txt"
    assert written.read_bytes() == (
        b"a.png\tempty file\nodd\\tname\xff.png\tnot an image\nz/b.jpg\ttruncated image\n"
    )


def test_skip_log_records_batches(mixed_folder: tuple[Path, dict[str, str | None]]) -> None:
    root, expected = mixed_folder
    dataset = data.ImageFolder(root, transform=data.make_transform(8))
    log = data.SkipLog(warn=lambda line: None)
    log.record_batch(data.collate([dataset[i] for i in range(len(dataset))]), dataset.keys)
    assert dict(log.entries) == {k: r for k, r in expected.items() if r is not None}


def test_skip_log_fail_policy_raises_with_the_fix() -> None:
    log = data.SkipLog("fail", warn=lambda line: None)
    message = "cat/1.jpg: truncated image; fix or remove it, or use --on-bad-image skip"
    with pytest.raises(BadImageError) as caught:
        log.record("cat/1.jpg", "truncated image")
    assert str(caught.value) == message
    with pytest.raises(UsageError, match=r"must be 'skip' or 'fail', got 'ignore'"):
        data.SkipLog("ignore")


def test_default_warning_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    data.SkipLog().record("bad\udcff.png", "empty file")
    assert capsys.readouterr().err == "warning: skipping bad\\xff.png: empty file\n"


def test_ensure_readable_stops_at_first_good_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "0.jpg").write_bytes(b"")
    for i in range(1, 5):
        save_rgb(tmp_path / f"{i}.png")
    dataset = data.ImageFolder(tmp_path)
    calls: list[Path] = []
    real_load = data.load_rgb

    def counting_load(path: Path, min_side: int | None = None) -> Image.Image:
        calls.append(path)
        return real_load(path, min_side)

    monkeypatch.setattr(data, "load_rgb", counting_load)
    data.ensure_readable(dataset)
    assert [p.name for p in calls] == ["0.jpg", "1.png"]


def test_ensure_readable_fails_when_nothing_decodes(
    mixed_folder: tuple[Path, dict[str, str | None]],
) -> None:
    root, _ = mixed_folder
    dataset = data.ImageFolder(root, paths=sorted(root.glob("bad/*")))
    with pytest.raises(DimError) as caught:
        data.ensure_readable(dataset)
    assert str(caught.value) == (
        f"no readable image in {root} (5 files tried, first: bad/bomb.png: image too large: "
        "100000x90000 pixels); add JPEG/PNG images that open in an image viewer"
    )


# ==== normalisation ====


def test_normalize_matches_hand_computation() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)

    out = data.normalize(images, mean, std)

    expected = torch.empty(2, 3, 4, 5, dtype=torch.float64)
    for n in range(2):
        for c in range(3):
            for y in range(4):
                for x in range(5):
                    value = images[n, c, y, x].item() / 255.0
                    expected[n, c, y, x] = (value - mean[c]) / std[c]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_normalize_paper_constants_map_to_minus_one_one() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = data.normalize(images.contiguous(), data.PAPER_MEAN, data.PAPER_STD)
    assert out[0, :, 0].tolist() == [[-1.0, 1.0]] * 3


def test_normalize_keeps_channels_last() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = data.normalize(images.to(memory_format=torch.channels_last), (0.5,) * 3, (0.5,) * 3)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, data.normalize(images, (0.5,) * 3, (0.5,) * 3))


def test_normalize_rejects_bad_arguments() -> None:
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    with pytest.raises(UsageError, match=r"one value per channel \(3\), got 2 and 3"):
        data.normalize(images, (0.5, 0.5), (0.5,) * 3)
    with pytest.raises(UsageError, match=r"std values must be positive"):
        data.normalize(images, (0.5,) * 3, (0.5, 0.0, 0.5))
    with pytest.raises(TypeError, match=r"expects uint8 images, got torch.float32"):
        data.normalize(images.float(), (0.5,) * 3, (0.5,) * 3)


# ==== shared fixtures ====


def test_make_image_folder_fixture(tmp_path: Path, make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder(tmp_path / "noise", 6, (12, 10))
    dataset = data.ImageFolder(root, transform=data.make_transform(8))
    assert dataset.labels == ["class0"] * 3 + ["class1"] * 3
    assert all(dataset[i].image is not None for i in range(len(dataset)))
    assert data.load_rgb(root / "class1/0001.png").size == (12, 10)


def test_cifar_subset_decodes_through_the_pipeline(cifar_subset: Path) -> None:
    from conftest import CIFAR_CLASSES, CIFAR_TEST_PER_CLASS, CIFAR_TRAIN_PER_CLASS

    train = data.ImageFolder(cifar_subset / "train", transform=data.make_transform(32))
    test = data.ImageFolder(cifar_subset / "test", transform=data.make_transform(32))
    assert len(train) == CIFAR_TRAIN_PER_CLASS * len(CIFAR_CLASSES)
    assert len(test) == CIFAR_TEST_PER_CLASS * len(CIFAR_CLASSES)
    assert sorted({label or "" for label in train.labels}) == list(CIFAR_CLASSES)

    data.ensure_readable(train)
    batch = data.collate([train[i] for i in range(0, len(train), 37)])
    assert batch.skipped == [] and batch.images.shape[1:] == (3, 32, 32)
    assert 20 < batch.images.float().mean().item() < 235  # real pictures, not blank
