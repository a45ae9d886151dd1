"""Tests for dimcli.report and `dim report`: a self-contained page from a synthetic run folder."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dimcli import plots
from dimcli.cli import app
from dimcli.errors import DimError, UsageError
from dimcli.features import FeatureWriter
from dimcli.modelfile import save_encoder
from dimcli.models import build_encoder
from dimcli.report import nearest_neighbours, read_metrics, write_report

SECTIONS = ("summary", "curves", "retrieval", "probe", "model", "data", "settings")
CLASSES = ["class0", "class1", "class2"]


def _probe_doc(label: str = "trained encoder, conv layer") -> dict[str, object]:
    confusion = [[3, 1, 0], [0, 4, 0], [1, 0, 3]]
    result = {
        "method": "linear",
        "top1": 10 / 12,
        "top5": None,
        "macro_f1": 0.8,
        "per_class": {c: 0.8 for c in CLASSES},
        "confusion": confusion,
        "n_train": 30,
        "n_test": 12,
        "classes": CLASSES,
        "extra": {},
    }
    knn = {**result, "method": "knn", "top1": 0.5}
    return {"seed": 0, "dim": 8, "classes": CLASSES, "results": [result, knn], "label": label}


@pytest.fixture
def run_dir(tmp_path: Path, make_image_folder: Callable[..., Path]) -> Path:
    """A run folder as `dim train` leaves it, written by hand, plus its image folder."""
    images = make_image_folder(tmp_path / "images", 12, 32)
    run = tmp_path / "run"
    run.mkdir()
    config = {
        "format": "dimcli.run",
        "settings": {"images": str(images), "encoder": "conv32", "preset": "dim-l", "seed": 0},
        "resolved": {"num_images": 12, "image_size": 32, "augment": "none", "device": "cpu"},
        "versions": {"dimcli": "0.1.0", "torch": torch.__version__},
        "git_sha": None,
        "created": "2024-01-01T00:00:00+00:00",
    }
    (run / "config.json").write_text(json.dumps(config))
    lines = [
        json.dumps(
            {
                "kind": "step",
                "step": 10 * i,
                "epoch": 0,
                "images_per_s": 300.0 + i,
                "loss_total": 1.0 / i,
                "loss_local": 0.9 / i,
                "loss_disc": 1.38,
                "mi_local": -1.0 / i,
            }
        )
        for i in range(1, 6)
    ]
    lines.append(json.dumps({"kind": "epoch", "step": 50, "epoch": 1, "loss_total": 0.3}))
    lines.append('{"kind": "step", "step": 6')  # a line cut short by a crash
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    save_encoder(
        build_encoder("conv32", feature_dim=8),
        run / "encoder.safetensors",
        preprocessing={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "x"},
        training={"steps": 50},
    )
    (run / "probe.json").write_text(json.dumps(_probe_doc()))
    (run / "skipped.txt").write_text("class0/broken.png\tnot an image\n")
    return run


def _png_sources(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


# ==== the full report ====


def test_report_is_self_contained_and_has_every_section(run_dir: Path) -> None:
    out = write_report(run_dir, k=3, queries=2)

    assert out == run_dir / "report.html"
    page = out.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page  # nothing fetched from a network
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:|#)', page), "only data URIs and in-page links"
    assert "data:image/png;base64," in page
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    # Every metric key shows up (the last values go into the summary).
    for key in ("loss_total", "loss_local", "loss_disc", "mi_local"):
        assert f"last {key}" in page
    assert "1 line(s) of metrics.jsonl were not JSON objects" in page
    assert "class0/broken.png" in page  # skipped files listed
    assert "83.3 %" in page  # linear top-1 of probe.json
    assert "conv32" in page and "4096" in page  # model summary: encoder and conv layer size


def test_figures_are_written_decodable_and_inlined(run_dir: Path) -> None:
    write_report(run_dir, k=3, queries=2)
    figures = run_dir / "figures"
    expected = {
        "losses.png": plots.CHART_SIZE,
        "mi.png": plots.CHART_SIZE,
        "throughput.png": plots.CHART_SIZE,
        "neighbours.png": plots.retrieval_size(2, 3),
        "confusion-linear.png": plots.heatmap_size(3),
        "confusion-knn.png": plots.heatmap_size(3),
    }
    assert sorted(p.name for p in figures.iterdir()) == sorted(expected)
    inlined = _png_sources((run_dir / "report.html").read_text(encoding="utf-8"))
    for name, size in expected.items():
        with Image.open(figures / name) as img:
            img.load()
            assert img.size == size, name
        assert (figures / name).read_bytes() in inlined, f"{name} is not the inlined image"


def test_report_out_option_and_probe_option(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-probe.json"
    other.write_text(json.dumps(_probe_doc(label="from elsewhere")))
    out = write_report(run_dir, tmp_path / "elsewhere" / "r.html", probe=other, queries=1, k=1)
    page = out.read_text(encoding="utf-8")
    assert out == tmp_path / "elsewhere" / "r.html"
    assert "from elsewhere" in page
    assert "trained encoder, conv layer" not in page  # --probe replaces the run's probe.json
    assert (run_dir / "figures" / "losses.png").is_file()  # figures stay in the run folder


def test_retrieval_uses_given_features(run_dir: Path, tmp_path: Path) -> None:
    images = Path(json.loads((run_dir / "config.json").read_text())["settings"]["images"])
    keys = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    # Two tight clusters by class: each image's neighbours are its own class.
    rng = np.random.default_rng(0)
    rows = np.stack([np.eye(4)[int(k[5])] + 0.01 * rng.normal(size=4) for k in keys])
    feats = tmp_path / "feats.npy"
    with FeatureWriter(feats, dim=4, capacity=len(keys)) as writer:
        writer.write(rows.astype(np.float32), keys)

    write_report(run_dir, features=feats, k=3, queries=2)
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "features from feats.npy" in page
    assert "4-dimensional features" in page
    assert "100.0 % of the top-3 neighbours share the query" in page


def test_retrieval_note_when_feature_paths_match_no_image(run_dir: Path, tmp_path: Path) -> None:
    feats = tmp_path / "feats.npy"
    with FeatureWriter(feats, dim=2, capacity=3) as writer:
        writer.write(np.eye(3, 2, dtype=np.float32), ["x/a.png", "x/b.png", "y/c.png"])
    write_report(run_dir, features=feats, k=1, queries=1)
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "none of the feature paths" in page
    assert not (run_dir / "figures" / "neighbours.png").exists()


def test_bare_run_still_gets_a_report_with_notes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    config = {"settings": {"images": str(tmp_path / "gone"), "encoder": "conv32"}}
    (run / "config.json").write_text(json.dumps(config))

    page = write_report(run).read_text(encoding="utf-8")

    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert "No metrics.jsonl in the run folder" in page
    assert f"the image folder {tmp_path / 'gone'} is not available" in page
    assert "No probe.json in the run folder" in page
    assert "No encoder.safetensors in the run folder" in page
    assert "data:image/png" not in page
    assert list((run / "figures").iterdir()) == []


def test_run_with_only_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 1, "loss_x": 2.0}))
    page = write_report(run).read_text(encoding="utf-8")
    assert "no config.json in the run folder" in page
    assert "No mi_* values in metrics.jsonl" in page
    assert (run / "figures" / "losses.png").is_file()


def test_damaged_probe_file_is_noted(run_dir: Path) -> None:
    (run_dir / "probe-broken.json").write_text("{not json")
    page = write_report(run_dir, k=1, queries=1).read_text(encoding="utf-8")
    assert "probe-broken.json is not a probe report" in page
    assert "83.3 %" in page  # the good probe.json is still shown


# ==== errors ====


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_bad_run_folder_raises(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("hello")
    elif kind == "empty":
        path.mkdir()
    with pytest.raises(DimError, match="pass a folder `dim train` wrote|pass the folder a run"):
        write_report(path)


def test_bad_numbers_raise(run_dir: Path) -> None:
    with pytest.raises(UsageError, match="--k must be at least 1"):
        write_report(run_dir, k=0)
    with pytest.raises(UsageError, match="--queries must be at least 1"):
        write_report(run_dir, queries=0)
    with pytest.raises(UsageError, match="unknown layer 'z'"):
        write_report(run_dir, layer="z")


def test_missing_probe_option_file_raises(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DimError, match="probe report .* does not exist"):
        write_report(run_dir, probe=tmp_path / "nope.json")


# ==== the command ====


def test_cli_writes_report(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    result = CliRunner().invoke(
        app, ["report", str(run_dir), "-o", str(out), "--k", "2", "--queries", "1"]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert out.is_file()


def test_cli_bad_run_folder_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run folder")


def test_cli_bad_k_exits_2(run_dir: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(run_dir), "--k", "0"])
    assert result.exit_code == 2
    assert "--k must be at least 1" in result.output


# ==== pieces ====


def test_nearest_neighbours_match_a_loop_reference() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    queries = np.array([0, 7, 29])
    idx, sims = nearest_neighbours(x, queries, 4)

    for qi, q in enumerate(queries):
        scored = []
        for j in range(len(x)):
            if j == q:
                continue
            cos = float(np.dot(x[q], x[j]) / (np.linalg.norm(x[q]) * np.linalg.norm(x[j])))
            scored.append((cos, j))
        scored.sort(key=lambda t: (-t[0], t[1]))
        assert list(idx[qi]) == [j for _, j in scored[:4]]
        np.testing.assert_allclose(sims[qi], [c for c, _ in scored[:4]], rtol=1e-6)


def test_read_metrics_counts_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n[1, 2]\n{"step": 2\n{"step": 3}\n')
    records, bad = read_metrics(path)
    assert [r["step"] for r in records] == [1, 3]
    assert bad == 2


def test_retrieval_note_when_on_the_fly_encoding_fails(run_dir: Path) -> None:
    (run_dir / "encoder.safetensors").write_bytes(b"damaged")
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "Skipped: could not encode the images of" in page
    assert "encoder.safetensors could not be read" in page  # the model section says so too
