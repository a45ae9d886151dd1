"""Model files: round trips and every way a file can be bad."""

from __future__ import annotations

import json
import pickle
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dimcli.errors import ModelFileError
from dimcli.modelfile import (
    FORMAT_VERSION,
    load_encoder,
    read_metadata,
    resolve_model_path,
    save_encoder,
)
from dimcli.models import build_encoder

PREP = {
    "image_size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "resize": "shorter-side+center-crop",
}


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    enc = build_encoder("conv32", feature_dim=16)
    path = tmp_path / "run" / "encoder.safetensors"
    save_encoder(enc, path, preprocessing=PREP, training={"estimator": "jsd"})
    return path


def _rewrite_metadata(src: Path, dst: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = json.loads(fh.metadata()["dimcli"])
    edit(meta, tensors)
    save_file(tensors, str(dst), metadata={"dimcli": json.dumps(meta)})


def test_round_trip_gives_equal_outputs(model_file: Path) -> None:
    torch.manual_seed(0)
    enc = build_encoder("conv32", feature_dim=16).eval()
    loaded = load_encoder(model_file)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for layer in ("conv", "fc", "y"):
            torch.testing.assert_close(loaded.module(x)[layer], enc(x)[layer])
    assert loaded.image_size == 32 and loaded.mean == (0.5, 0.5, 0.5)
    assert loaded.metadata["training"] == {"estimator": "jsd"}
    assert loaded.metadata["layers"]["conv"] == [256, 4, 4]


def test_encode_takes_uint8_images(model_file: Path) -> None:
    loaded = load_encoder(model_file)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    feats = loaded.encode(images, "conv")
    assert feats.shape == (2, 256 * 16)
    expected = loaded.module((images.float() / 255 - 0.5) / 0.5)["conv"].flatten(1)
    torch.testing.assert_close(feats, expected)


def test_run_folder_resolves_to_its_model(model_file: Path) -> None:
    assert resolve_model_path(model_file.parent) == model_file
    assert load_encoder(model_file.parent).path == model_file


def test_save_is_atomic_and_leaves_no_temp_files(model_file: Path) -> None:
    assert [p.name for p in model_file.parent.iterdir()] == ["encoder.safetensors"]


def test_failed_save_keeps_the_previous_file(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = model_file.read_bytes()

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dimcli.modelfile.save_file", boom)
    with pytest.raises(OSError):
        save_encoder(build_encoder("conv32"), model_file, preprocessing=PREP)
    assert model_file.read_bytes() == before
    assert len(list(model_file.parent.iterdir())) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (b"\x00" * 4, "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
        (struct.pack("<Q", 5) + b"notjs", "header is not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
    ],
)
def test_garbage_files_are_rejected(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        load_encoder(path)


@pytest.mark.parametrize(
    "content",
    [
        # A header length of 1 TB in a tiny file.
        struct.pack("<Q", 10**12) + b"{}",
        # A well-formed header whose one tensor claims 2**40 float32 values.
        (lambda h: struct.pack("<Q", len(h)) + h)(
            json.dumps(
                {"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4 * 2**40]}}
            ).encode()
        ),
    ],
    ids=["header-length", "tensor-size"],
)
def test_lying_headers_fail_fast_without_allocating(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "liar.safetensors"
    path.write_bytes(content + b"\0" * 64)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ModelFileError, match="does not fit|claims bytes"):
            load_encoder(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5.0
    assert peak < 1 << 20, f"{peak} bytes allocated to reject a {path.stat().st_size}-byte file"


def test_random_bytes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(
        torch.randint(
            0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        .numpy()
        .tobytes()
    )
    with pytest.raises(ModelFileError):
        load_encoder(path)


def test_pickle_renamed_is_rejected_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelFileError):
        load_encoder(path)
    assert not marker.exists()


def test_truncated_file_is_rejected(model_file: Path, tmp_path: Path) -> None:
    data = model_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_encoder(path)


def test_flipped_header_bytes_are_rejected(model_file: Path, tmp_path: Path) -> None:
    data = bytearray(model_file.read_bytes())
    data[8:20] = b"\xff" * 12
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="not JSON"):
        load_encoder(path)


def test_foreign_safetensors_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="not a dimcli encoder"):
        load_encoder(path)


def test_newer_format_asks_for_an_upgrade(model_file: Path, tmp_path: Path) -> None:
    dst = tmp_path / "new.safetensors"
    _rewrite_metadata(model_file, dst, lambda m, t: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match="upgrade dimcli"):
        read_metadata(dst)


def test_unknown_encoder_is_named(model_file: Path, tmp_path: Path) -> None:
    dst = tmp_path / "unknown.safetensors"
    _rewrite_metadata(model_file, dst, lambda m, t: m["encoder"].update(name="vit"))
    with pytest.raises(ModelFileError, match="unknown encoder 'vit'"):
        load_encoder(dst)


def test_unparseable_metadata_is_reported(model_file: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(model_file), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    dst = tmp_path / "badmeta.safetensors"
    save_file(tensors, str(dst), metadata={"dimcli": "{not json"})
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_encoder(dst)


def test_wrong_shapes_and_names_are_listed(model_file: Path, tmp_path: Path) -> None:
    def edit(meta: dict, tensors: dict) -> None:
        tensors["head.weight"] = torch.zeros(3, 3)
        del tensors["head.bias"]
        tensors["extra.weight"] = torch.zeros(1)

    dst = tmp_path / "shapes.safetensors"
    _rewrite_metadata(model_file, dst, edit)
    with pytest.raises(ModelFileError) as info:
        load_encoder(dst)
    msg = str(info.value)
    assert "missing head.bias" in msg
    assert "unexpected extra.weight" in msg
    assert "head.weight (3, 3) vs (16, 1024)" in msg


def test_wrong_dtype_is_rejected(model_file: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dtype.safetensors"
    _rewrite_metadata(
        model_file, dst, lambda m, t: t.update({"head.bias": torch.zeros(16, dtype=torch.int32)})
    )
    with pytest.raises(ModelFileError, match="non-float weights head.bias"):
        load_encoder(dst)


def test_missing_model_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="train one first"):
        resolve_model_path(tmp_path / "runs" / "latest")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="folder without encoder.safetensors"):
        resolve_model_path(tmp_path / "empty")


def test_model_file_permissions_follow_the_umask(model_file: Path) -> None:
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert model_file.stat().st_mode & 0o777 == 0o666 & ~mask
