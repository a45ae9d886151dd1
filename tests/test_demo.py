"""Tests for dimcli.demo and `dim demo`: a tiny end-to-end run on the bundled sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dimcli.cli import app
from dimcli.demo import DEMO_LAYERS, MODELS, PROBES, auto_threads, default_out
from dimcli.features import read_features
from dimcli.models import build_encoder

# Tiny settings: 4 training and 2 test images per class, 2 steps, narrow critics.
TINY = ["--steps", "2", "--per-class", "4", "--mi-units", "16", "--workers", "0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny demo run (shared by the tests below): its folder and its printed output."""
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "demo-out"
    env = {"DIM_CACHE_DIR": str(tmp / "cache"), "COLUMNS": "300", "NO_COLOR": "1"}
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["demo", "--out", str(out), *TINY], env=env)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads, "the demo restores the thread count"
    return out, result.output


def test_demo_writes_models_features_probes_and_report(demo: tuple[Path, str]) -> None:
    out, _ = demo
    for name in ("encoder.safetensors", "random-init.safetensors", "config.json", "report.html"):
        assert (out / name).is_file(), name
    for name in MODELS:
        for layer in DEMO_LAYERS:
            x_train, keys_train = read_features(out / "features" / f"{name}-{layer}-train.npy")
            x_test, keys_test = read_features(out / "features" / f"{name}-{layer}-test.npy")
            assert x_train.shape[0] == 40 and x_test.shape[0] == 20
            assert {k.split("/")[0] for k in keys_train} == {k.split("/")[0] for k in keys_test}
            assert x_train.shape[1] == (4096 if layer == "conv" else 64)
    probe_files = ["probe.json", "probe-trained-y.json", "probe-random-conv.json"]
    for name in [*probe_files, "probe-random-y.json"]:
        doc = json.loads((out / name).read_text())
        assert [r["method"] for r in doc["results"]] == list(PROBES)
        assert doc["split"] == "test-set" and doc["n_train"] == 40 and doc["n_test"] == 20
        assert len(doc["classes"]) == 10
    assert json.loads((out / "probe.json").read_text())["label"] == "trained encoder, conv layer"


def test_demo_summary_json_matches_probe_files(demo: tuple[Path, str]) -> None:
    out, _ = demo
    summary = json.loads((out / "demo.json").read_text())
    probe = json.loads((out / "probe-random-y.json").read_text())
    expected = {r["method"]: r["top1"] for r in probe["results"]}
    assert summary["accuracy"]["random/y"] == expected
    assert set(summary["accuracy"]) == {f"{m}/{layer}" for m in MODELS for layer in DEMO_LAYERS}
    assert summary["seconds"]["total"] >= summary["seconds"]["train"] > 0


def test_demo_report_shows_trained_and_random_probes(demo: tuple[Path, str]) -> None:
    out, _ = demo
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "random encoder, conv layer" in page and "trained encoder, y layer" in page
    assert (out / "figures" / "neighbours.png").is_file()
    assert (out / "figures" / "losses.png").is_file()
    assert (out / "figures" / "confusion-linear.png").is_file()


def test_demo_prints_table_and_paths(demo: tuple[Path, str]) -> None:
    out, printed = demo
    assert str(out / "report.html") in printed
    assert str(out / "random-init.safetensors") in printed
    assert "trained, conv layer" in printed and "random, y layer" in printed


def test_random_init_is_the_seeded_untrained_encoder(demo: tuple[Path, str]) -> None:
    out, _ = demo
    saved = load_file(str(out / "random-init.safetensors"))
    torch.manual_seed(0)
    fresh = build_encoder("conv32", image_size=32, feature_dim=64).state_dict()
    assert saved.keys() == fresh.keys()
    for key, value in fresh.items():
        assert torch.equal(saved[key], value), key
    trained = load_file(str(out / "encoder.safetensors"))
    assert not torch.equal(trained["conv1.0.weight"], saved["conv1.0.weight"])


def test_random_and_trained_features_differ(demo: tuple[Path, str]) -> None:
    out, _ = demo
    a, _ = read_features(out / "features" / "trained-y-test.npy")
    b, _ = read_features(out / "features" / "random-y-test.npy")
    assert not np.allclose(a, b)


# ==== errors ====


def test_demo_refuses_a_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), *TINY])
    assert result.exit_code == 2
    assert "already exists and is not empty; pass another --out" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--per-class", "1"], "--per-class must be between 2 and 200"),
        (["--per-class", "201"], "--per-class must be between 2 and 200"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
    ],
)
def test_demo_bad_numbers_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "d").exists()


def test_default_out_is_a_fresh_runs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import datetime

    monkeypatch.chdir(tmp_path)
    now = datetime(2024, 5, 6, 7, 8, 9)
    assert default_out(now) == Path("runs/demo-20240506-070809")
    (tmp_path / "runs" / "demo-20240506-070809").mkdir(parents=True)
    assert default_out(now) == Path("runs/demo-20240506-070809-2")


@pytest.mark.parametrize(("load", "expected"), [(0.0, 2), (0.7, 1), (1.2, 1), (9.0, 1)])
def test_auto_threads_leaves_busy_cores_alone(
    monkeypatch: pytest.MonkeyPatch, load: float, expected: int
) -> None:
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    assert auto_threads(2) == expected


def test_auto_threads_without_load_average(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr("os.getloadavg", unavailable)
    assert auto_threads(4) == 4
