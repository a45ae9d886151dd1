"""Tests for dimcli/encode.py, `dim encode` and the in-memory API of LoadedEncoder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import dimcli
from dimcli import encode as encode_mod
from dimcli.cli import app
from dimcli.encode import (
    BatchEmbedder,
    encode_folder,
    resolve_device,
    resolve_precision,
    skipped_list_path,
)
from dimcli.errors import BadImageError, DimError, UsageError
from dimcli.features import FeatureWriter, index_path, read_features
from dimcli.modelfile import save_encoder
from dimcli.models import build_encoder

PREPROCESSING = {
    "image_size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "resize": "shorter-side-center-crop",
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Small convolutions; on a shared 2-core machine a second intra-op thread only spins.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A conv32 encoder (y: 16 dims) with random weights, saved in a run folder."""
    torch.manual_seed(0)
    path = tmp_path / "run" / "encoder.safetensors"
    save_encoder(build_encoder("conv32", feature_dim=16), path, preprocessing=PREPROCESSING)
    return path


@pytest.fixture
def images(tmp_path: Path, make_image_folder: Callable[..., Path]) -> Path:
    """12 noise PNGs of 40x30 pixels (resized and cropped to 32), in class0/ and class1/."""
    return make_image_folder(tmp_path / "images", 12, (40, 30))


def _sorted_keys(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def _cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# ==== rows, formats, layers ====


def test_rows_follow_the_index_in_sorted_path_order(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    out = tmp_path / "feats.npy"
    result = encode_folder(
        images, out, model=model_file, batch_size=5, workers=0, device="cpu", progress=False
    )
    feats, keys = read_features(out)
    assert keys == _sorted_keys(images)
    assert (result.n_rows, result.dim, result.n_skipped) == (12, 16, 0)
    assert feats.shape == (12, 16) and feats.dtype == np.float32
    assert index_path(out).read_text().splitlines()[:2] == ["row,path", "0,class0/0000.png"]

    # Each row is its own image's features: encode the files one at a time.
    loaded = dimcli.load_encoder(model_file)
    for row, key in enumerate(keys):
        expected = loaded.encode(images / key).numpy()[0]
        np.testing.assert_allclose(feats[row], expected, rtol=1e-5, atol=1e-5)


def test_npy_npz_and_csv_hold_the_same_rows(tmp_path: Path, images: Path, model_file: Path) -> None:
    found = {}
    for suffix in ("npy", "npz", "csv"):
        out = tmp_path / f"feats.{suffix}"
        encode_folder(images, out, model=model_file, workers=0, device="cpu", progress=False)
        found[suffix] = read_features(out)
    ref_feats, ref_keys = found["npy"]
    for suffix in ("npz", "csv"):
        feats, keys = found[suffix]
        assert keys == ref_keys, suffix
        # .csv keeps 9 significant digits, which bring float32 back exactly.
        np.testing.assert_array_equal(feats, ref_feats, err_msg=suffix)


def test_csv_columns_are_path_then_one_per_dimension(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    out = tmp_path / "feats.csv"
    encode_folder(images, out, model=model_file, workers=0, device="cpu", progress=False)
    header = out.read_text().splitlines()[0].split(",")
    assert header == ["path", *(f"f{j}" for j in range(16))]


@pytest.mark.parametrize(
    ("layer", "pool", "dim"), [("y", "none", 16), ("fc", "none", 1024), ("conv", "none", 4096)]
)
def test_layers_have_their_widths(
    tmp_path: Path, images: Path, model_file: Path, layer: str, pool: str, dim: int
) -> None:
    out = tmp_path / "feats.npy"
    encode_folder(images, out, model=model_file, layer=layer, pool=pool, workers=0, progress=False)
    assert read_features(out)[0].shape == (12, dim)


def test_conv_avg_pool_is_the_mean_over_locations(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    flat_out, avg_out = tmp_path / "flat.npy", tmp_path / "avg.npy"
    kw = {"model": model_file, "layer": "conv", "workers": 0, "progress": False}
    encode_folder(images, flat_out, pool="none", **kw)  # type: ignore[arg-type]
    encode_folder(images, avg_out, pool="avg", **kw)  # type: ignore[arg-type]
    flat, avg = read_features(flat_out)[0], read_features(avg_out)[0]
    assert avg.shape == (12, 256)
    # Reference: the flattened (C, H, W) map, averaged over its 4x4 locations by hand.
    n = flat.shape[0]
    expected = np.zeros((n, 256), dtype=np.float64)
    for i in range(n):
        for c in range(256):
            expected[i, c] = sum(flat[i, c * 16 + loc] for loc in range(16)) / 16
    np.testing.assert_allclose(avg, expected, rtol=1e-4, atol=1e-5)


def test_cli_pool_avg_needs_layer_conv(tmp_path: Path, images: Path, model_file: Path) -> None:
    code, _, err = _cli("encode", images, "-o", tmp_path / "f.npy", "--model", model_file,
                        "--pool", "avg")  # fmt: skip
    assert code == 2
    assert "--pool avg" in err and "--layer conv" in err
    assert not (tmp_path / "f.npy").exists()


def test_cli_writes_features_and_one_summary_line(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    out = tmp_path / "feats.npz"
    code, stdout, err = _cli("encode", images, "-o", out, "--model", model_file.parent,
                             "--workers", "0", "--batch-size", "4")  # fmt: skip
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    assert "12 rows x 16 dims" in lines[0] and "0 skipped" in lines[0]
    assert "images/s" in lines[0] and str(out) in lines[0]
    assert read_features(out)[0].shape == (12, 16)


def test_cli_quiet_prints_nothing(tmp_path: Path, images: Path, model_file: Path) -> None:
    code, stdout, err = _cli("encode", images, "-o", tmp_path / "f.npy", "--model", model_file,
                             "--workers", "0", "-q")  # fmt: skip
    assert code == 0 and stdout == "" and err == ""


def test_plain_progress_lines_when_not_a_terminal(
    tmp_path: Path, images: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    encode_folder(images, tmp_path / "f.npy", model=model_file, batch_size=3, workers=0)
    lines = capsys.readouterr().err.strip().splitlines()
    # 12 images in batches of 3: a line at 25%, 50% and 75% (the summary is the caller's).
    assert lines == [
        line
        for line in lines
        if line.startswith("encoding ") and "images (" in line and "img/s" in line
    ]
    assert [line.split()[1] for line in lines] == ["3/12", "6/12", "9/12"]


# ==== in-memory API ====


def test_api_matches_cli_for_pil_images_paths_and_tensors(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    out = tmp_path / "feats.npy"
    code, _, err = _cli("encode", images, "-o", out, "--model", model_file, "--workers", "0",
                        "--batch-size", "5")  # fmt: skip
    assert code == 0, err
    cli_feats, keys = read_features(out)

    loaded = dimcli.load_encoder(model_file)
    paths = [images / k for k in keys]
    pil = [Image.open(p) for p in paths]
    by_path = loaded.encode(paths).numpy()
    by_pil = loaded.encode(pil).numpy()
    np.testing.assert_allclose(by_path, cli_feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(by_pil, by_path)

    # uint8 tensors already at the model's size are used as they are.
    x = loaded.preprocess(paths)  # (N, 3, 32, 32), normalised to [-1, 1]
    batch = ((x * 0.5 + 0.5) * 255).round().to(torch.uint8)
    assert batch.shape == (12, 3, 32, 32) and batch.dtype == torch.uint8
    np.testing.assert_array_equal(loaded.encode(batch).numpy(), by_path)
    # Other batch sizes may round differently inside the convolutions.
    one, two = loaded.encode(batch[0]).numpy(), loaded.encode(list(batch[:2])).numpy()
    np.testing.assert_allclose(one, by_path[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two, by_path[:2], rtol=1e-5, atol=1e-6)


def test_preprocess_gives_the_normalised_model_input(model_file: Path) -> None:
    loaded = dimcli.load_encoder(model_file)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = loaded.preprocess(Image.fromarray(pixels))
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    expected = (pixels.transpose(2, 0, 1).astype(np.float64) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)
    y = loaded.module(x)["y"]
    torch.testing.assert_close(loaded.encode(Image.fromarray(pixels)), y.detach())


def test_api_resizes_and_crops_like_the_eval_transform(model_file: Path) -> None:
    loaded = dimcli.load_encoder(model_file)
    # A 64x96 image: shorter side 64 -> 32 (so 48 wide), then the centre 32 columns.
    pixels = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    resized = np.asarray(image.resize((48, 32), Image.Resampling.BILINEAR)).astype(np.float64)
    x = loaded.preprocess(image)[0].permute(1, 2, 0).numpy()  # (3, 32, 32) -> (32, 32, 3)
    got = (x * 0.5 + 0.5) * 255  # undo the normalisation
    centre, left = resized[:, 8:40], resized[:, :32]
    # Pillow resamples only the cropped region, so values differ by rounding, not by place.
    assert np.abs(got - centre).mean() < 2.0
    assert np.abs(got - left).mean() > 20.0


def test_api_composites_transparency_on_white_like_files(tmp_path: Path, model_file: Path) -> None:
    loaded = dimcli.load_encoder(model_file)
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # fully transparent black
    path = tmp_path / "clear.png"
    Image.fromarray(rgba).save(path)
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    torch.testing.assert_close(loaded.encode(Image.fromarray(rgba)), loaded.encode(white))
    torch.testing.assert_close(loaded.encode(path), loaded.encode(white))


def test_api_rejects_wrong_inputs_with_clear_messages(tmp_path: Path, model_file: Path) -> None:
    loaded = dimcli.load_encoder(model_file)
    with pytest.raises(TypeError, match="uint8"):
        loaded.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        loaded.encode(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="cannot encode a int"):
        loaded.encode([3])
    with pytest.raises(ValueError, match="no images"):
        loaded.encode([])
    with pytest.raises(ValueError, match="pool 'avg' applies to layer 'conv'"):
        loaded.encode(torch.zeros(3, 32, 32, dtype=torch.uint8), layer="y", pool="avg")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadImageError, match=r"bad\.png: not an image"):
        loaded.encode(bad)


def test_api_layers_and_feature_dim_agree(model_file: Path) -> None:
    loaded = dimcli.load_encoder(model_file)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    for layer, pool, dim in [("y", "none", 16), ("fc", "none", 1024), ("conv", "avg", 256)]:
        assert loaded.feature_dim(layer, pool) == dim
        assert loaded.encode(image, layer=layer, pool=pool).shape == (1, dim)


# ==== streaming and interruption ====


def test_rows_stream_to_disk_one_batch_at_a_time(
    tmp_path: Path,
    make_image_folder: Callable[..., Path],
    model_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = make_image_folder(tmp_path / "many", 300, 8)
    events: list[tuple[str, int]] = []
    real_write = FeatureWriter.write

    def embed(self: BatchEmbedder, images: torch.Tensor) -> torch.Tensor:
        # The loop is under test, not the network: rows are the mean pixel, repeated.
        events.append(("embed", len(images)))
        return images.float().mean(dim=(1, 2, 3))[:, None].expand(-1, self.dim).contiguous()

    def write(self: FeatureWriter, rows: np.ndarray, paths: list[str]) -> None:
        events.append(("write", len(rows)))
        real_write(self, rows, paths)

    monkeypatch.setattr(BatchEmbedder, "__call__", embed)
    monkeypatch.setattr(FeatureWriter, "write", write)
    out = tmp_path / "feats.npy"
    result = encode_folder(folder, out, model=model_file, batch_size=8, workers=0, progress=False)

    assert result.n_rows == 300
    # Every batch's rows reach the writer before the next batch is encoded, so the loop
    # never holds more than one batch of features.
    assert [kind for kind, _ in events] == ["embed", "write"] * 38
    rows_in_flight = [n for kind, n in events if kind == "write"]
    assert max(rows_in_flight) <= 8 and sum(rows_in_flight) == 300
    feats, keys = read_features(out)
    assert feats.shape == (300, 16)
    first = np.asarray(Image.open(folder / keys[0]).resize((32, 32))).mean()
    assert feats[0, 0] == pytest.approx(first, abs=2.0)


def _hidden_partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


@pytest.mark.parametrize("suffix", ["npy", "npz", "csv"])
def test_interrupted_encode_leaves_no_output_and_rerun_completes(
    tmp_path: Path, images: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"feats.{suffix}"
    real_embed = BatchEmbedder.__call__
    calls = 0

    def interrupted(self: BatchEmbedder, images: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_embed(self, images)

    monkeypatch.setattr(BatchEmbedder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_folder(images, out, model=model_file, batch_size=2, workers=0, progress=False)
    assert calls == 3
    assert list(out_dir.iterdir()) == []  # no output, no index, no temporary files

    monkeypatch.setattr(BatchEmbedder, "__call__", real_embed)
    result = encode_folder(images, out, model=model_file, batch_size=2, workers=0, progress=False)
    assert result.n_rows == 12 and read_features(out)[0].shape == (12, 16)


def test_interrupted_overwrite_keeps_the_old_output(
    tmp_path: Path, images: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "feats.npy"
    encode_folder(images, out, model=model_file, workers=0, progress=False)
    before = out.read_bytes(), index_path(out).read_bytes()

    def fail(self: BatchEmbedder, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(BatchEmbedder, "__call__", fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_folder(images, out, model=model_file, workers=0, progress=False, overwrite=True)
    assert (out.read_bytes(), index_path(out).read_bytes()) == before
    assert _hidden_partials(tmp_path) == []


_KILLED_ENCODE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dimcli import encode

    images, out, marker, model = sys.argv[1:5]
    real = encode.BatchEmbedder.__call__
    calls = 0

    def stall(self, batch):
        global calls
        calls += 1
        if calls == 3:  # two batches are in the temporary file: now wait to be killed
            Path(marker).touch()
            time.sleep(600)
        return real(self, batch)

    encode.BatchEmbedder.__call__ = stall
    encode.encode_folder(Path(images), Path(out), model=model, batch_size=2, workers=0,
                         progress=False)
    """
)


def test_killed_encode_leaves_no_output_and_rerun_completes(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, marker = out_dir / "feats.npy", tmp_path / "stalled"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_ENCODE, str(images), str(out), str(marker), str(model_file)],
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the encode never reached its third batch"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and not index_path(out).exists()
    # Only hidden temporary files may remain (see the Limitation in dimcli/encode.py).
    assert all(name.startswith(".") for name in os.listdir(out_dir))

    result = encode_folder(images, out, model=model_file, batch_size=2, workers=0, progress=False)
    assert result.n_rows == 12
    assert read_features(out)[1] == _sorted_keys(images)


# ==== existing outputs ====


def test_existing_output_is_refused_without_overwrite(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    out = tmp_path / "feats.npy"
    out.write_bytes(b"keep me")
    code, _, err = _cli("encode", images, "-o", out, "--model", model_file, "--workers", "0")
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: output {out} already exists; pass --overwrite to replace it or choose another -o"
    ]
    assert out.read_bytes() == b"keep me"

    for flag in ("--overwrite", "--force"):
        code, _, err = _cli("encode", images, "-o", out, "--model", model_file, "--workers", "0",
                            flag)  # fmt: skip
        assert code == 0, err
        assert read_features(out)[0].shape == (12, 16)


# ==== bad model files ====


def _foreign_safetensors(path: Path) -> None:
    save_file({"weight": torch.zeros(3, 3)}, str(path))


def _truncated_model(path: Path, model_file: Path) -> None:
    data = model_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _wrong_metadata(path: Path, model_file: Path) -> None:
    torch.manual_seed(0)
    save_encoder(build_encoder("conv32", feature_dim=16), path, preprocessing=PREPROCESSING)
    data = bytearray(path.read_bytes())
    at = data.find(b"conv32")
    data[at : at + 6] = b"convXX"  # same length: the header still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("foreign", "not a dimcli encoder"),
        ("truncated", "truncated"),
        ("random", "not a safetensors model file"),
        ("wrong-metadata", "unknown encoder 'convXX'"),
        ("missing", "not found"),
        ("empty-run-folder", "without encoder.safetensors"),
    ],
)
def test_bad_model_files_are_one_line_errors(
    tmp_path: Path, images: Path, model_file: Path, kind: str, expected: str
) -> None:
    bad = tmp_path / "bad.safetensors"
    if kind == "foreign":
        _foreign_safetensors(bad)
    elif kind == "truncated":
        _truncated_model(bad, model_file)
    elif kind == "random":
        _random_bytes(bad)
    elif kind == "wrong-metadata":
        _wrong_metadata(bad, model_file)
    elif kind == "missing":
        bad = tmp_path / "runs" / "latest"
    else:
        bad = tmp_path / "empty-run"
        bad.mkdir()
    out = tmp_path / "feats.npy"
    code, stdout, err = _cli("encode", images, "-o", out, "--model", bad, "--workers", "0")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err + stdout
    assert not out.exists()


def test_default_model_is_runs_latest(
    tmp_path: Path, images: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli("encode", images, "-o", "f.npy", "--workers", "0")
    assert code == 1 and "runs/latest not found (train one first with `dim train IMAGES`)" in err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").symlink_to(model_file.parent)
    code, _, err = _cli("encode", images, "-o", "f.npy", "--workers", "0")
    assert code == 0, err
    assert read_features(tmp_path / "f.npy")[0].shape == (12, 16)


# ==== bad images ====


def _add_bad_images(folder: Path) -> list[str]:
    (folder / "class0" / "0100.png").write_bytes(b"")  # empty
    (folder / "class1" / "0101.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # not decodable
    return ["class0/0100.png", "class1/0101.png"]


def test_bad_images_are_skipped_and_listed_beside_the_output(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    bad = _add_bad_images(images)
    out = tmp_path / "feats.npy"
    code, stdout, err = _cli("encode", images, "-o", out, "--model", model_file, "--workers", "0",
                             "--batch-size", "4")  # fmt: skip
    assert code == 0, err
    feats, keys = read_features(out)
    assert feats.shape == (12, 16) and not set(bad) & set(keys)
    assert np.isfinite(feats).all()
    listed = skipped_list_path(out)
    assert listed == tmp_path / "feats.skipped.txt"
    entries = [line.split("\t") for line in listed.read_text().splitlines()]
    assert [e[0] for e in entries] == bad
    assert entries[0][1] == "empty file"
    assert "2 skipped" in stdout and str(listed) in stdout
    for key in bad:
        assert f"warning: skipping {key}" in err


def test_stale_skipped_list_is_removed_when_nothing_is_skipped(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    bad = _add_bad_images(images)
    out = tmp_path / "feats.npy"
    encode_folder(images, out, model=model_file, workers=0, progress=False)
    assert skipped_list_path(out).exists()
    for key in bad:
        (images / key).unlink()
    result = encode_folder(images, out, model=model_file, workers=0, progress=False, overwrite=True)
    assert result.skipped_file is None and not skipped_list_path(out).exists()


def test_on_bad_image_fail_names_the_file_and_writes_nothing(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    _add_bad_images(images)
    out = tmp_path / "feats.npy"
    code, _, err = _cli("encode", images, "-o", out, "--model", model_file, "--workers", "0",
                        "--on-bad-image", "fail")  # fmt: skip
    assert code == 1
    assert err.strip().splitlines() == [
        "error: class0/0100.png: empty file; fix or remove it, or use --on-bad-image skip"
    ]
    assert sorted(os.listdir(tmp_path)) == ["images", "run"]


def test_folder_without_a_readable_image_is_an_error(tmp_path: Path, model_file: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    with pytest.raises(DimError, match="no readable image"):
        encode_folder(folder, tmp_path / "f.npy", model=model_file, workers=0, progress=False)


# ==== options ====


def test_unknown_output_extension_is_refused_before_loading(tmp_path: Path, images: Path) -> None:
    code, _, err = _cli("encode", images, "-o", tmp_path / "f.txt", "--model", tmp_path / "none")
    assert code == 1 and "use one of .npy, .npz, .csv" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "batch size must be at least 1, got 0"),
        (["--workers", "-1"], "--workers must be 0 (decode in the main process) or more, got -1"),
        (["--workers", "many"], "--workers must be auto or a number of processes, got 'many'"),
        (["--device", "tpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ],
)
def test_bad_options_are_usage_errors(
    tmp_path: Path, images: Path, model_file: Path, args: list[str], message: str
) -> None:
    code, _, err = _cli("encode", images, "-o", tmp_path / "f.npy", "--model", model_file, *args)
    assert code == 2
    assert err.strip() == f"error: {message}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_names_the_fix() -> None:
    with pytest.raises(UsageError, match="use --device cpu"):
        resolve_device("cuda")


def test_precision_resolves_per_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(UsageError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp8", cpu)


def test_bf16_rows_are_float32_and_close_to_fp32(
    tmp_path: Path, images: Path, model_file: Path
) -> None:
    kw = {"model": model_file, "workers": 0, "progress": False, "device": "cpu"}
    encode_folder(images, tmp_path / "a.npy", precision="fp32", **kw)  # type: ignore[arg-type]
    encode_folder(images, tmp_path / "b.npy", precision="bf16", **kw)  # type: ignore[arg-type]
    fp32, bf16 = read_features(tmp_path / "a.npy")[0], read_features(tmp_path / "b.npy")[0]
    assert bf16.dtype == np.float32
    assert not np.array_equal(fp32, bf16)  # autocast really ran in bf16
    np.testing.assert_allclose(bf16, fp32, atol=0.1 * np.abs(fp32).max())


def test_encode_batches_only_needs_batches_and_a_sink(model_file: Path) -> None:
    """The per-batch loop works on any iterable of batches (the hook for multi-process)."""
    from dimcli.data import Batch, SkipLog

    loaded = dimcli.load_encoder(model_file)
    embed = BatchEmbedder(loaded, "y", "none", torch.device("cpu"))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    batches = [
        Batch(images[:2], torch.tensor([0, 1])),
        Batch(images[2:], torch.tensor([3]), skipped=[(2, "truncated image")]),
    ]

    class Sink:
        def __init__(self) -> None:
            self.rows: list[np.ndarray] = []
            self.paths: list[str] = []

        def write(self, rows: np.ndarray, paths: Sequence[str]) -> None:
            self.rows.append(rows)
            self.paths.extend(paths)

    sink, log = Sink(), SkipLog("skip", warn=lambda _: None)
    seen: list[int] = []
    n = encode_mod.encode_batches(
        batches, embed=embed, keys=["a", "b", "c", "d"], sink=sink, skip_log=log,
        on_batch=seen.append,
    )  # fmt: skip
    assert n == 3 and sink.paths == ["a", "b", "d"] and seen == [2, 2]
    assert log.entries == [("c", "truncated image")]
    expected = loaded.encode(images).numpy()[[0, 1, 2]]
    np.testing.assert_allclose(np.concatenate(sink.rows), expected, rtol=1e-5, atol=1e-6)
