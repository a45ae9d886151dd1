"""The bench/ scripts: their helpers (fast) and a tiny run of each script (slow).

The scripts are not part of the package; they are imported from bench/ by path. Their speed
numbers are not asserted (speed goes in docs/benchmarks.md); only that each runs end to end
at a tiny size and prints its markdown table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import reproduce_cifar10  # noqa: E402
import soak  # noqa: E402

# ==== helpers (fast) ====


def test_markdown_table_layout() -> None:
    table = _common.markdown_table(["a", "b"], [[1, 2.345], ["x", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.3 |", "| x | - |"]


def test_markdown_table_digits_for_paper_numbers() -> None:
    table = _common.markdown_table(["v"], [[63.25]], digits=2)
    assert table.splitlines()[-1] == "| 63.25 |"


def _jpeg_tree(root: Path, per_class: dict[str, int]) -> Path:
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (i * 10 % 255, 0, 0)).save(root / cls / f"{i:04d}.jpg")
    return root


def test_subset_folder_takes_first_per_class_and_reuses(tmp_path: Path) -> None:
    src = _jpeg_tree(tmp_path / "src", {"cat": 5, "dog": 3})
    dst = _common.subset_folder(src, tmp_path / "dst", 2)
    got = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.jpg"))
    assert got == ["cat/0000.jpg", "cat/0001.jpg", "dog/0000.jpg", "dog/0001.jpg"]
    marker = dst / "cat" / "0000.jpg"
    mtime = marker.stat().st_mtime_ns
    assert _common.subset_folder(src, tmp_path / "dst", 2) == dst
    assert marker.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert _common.subset_folder(src, tmp_path / "other", None) == src


def test_machine_names_cpu_and_torch() -> None:
    info = _common.machine()
    assert info["cpus"] >= 1 and info["torch"]
    assert len(info["loadavg"]) == 3
    assert info["cpu"] in _common.machine_line(info)


def test_soak_folder_plants_every_kind_of_bad_file(tmp_path: Path) -> None:
    src = _jpeg_tree(tmp_path / "src", {"a": 10, "b": 10})
    bad = soak.make_folder(src, tmp_path / "dst", 20, 0.1, seed=0)
    assert len(bad) == 3  # at least 3, so that each kind occurs once
    sizes = [(tmp_path / "dst" / key).stat().st_size for key in bad]
    assert sizes[1] == 0  # zero-byte
    assert (tmp_path / "dst" / bad[2]).read_text().startswith("this is not an image")
    truncated = (tmp_path / "dst" / bad[0]).read_bytes()
    assert truncated[:2] == b"\xff\xd8" and len(truncated) > 0
    assert sum(1 for _ in (tmp_path / "dst").rglob("*.jpg")) == 23


def test_reproduce_tables_put_paper_numbers_in_the_same_layout() -> None:
    results = {
        "runs": {"jsd": {"steps": 10, "epochs": 0, "images_per_s": 50.0, "seconds": 12.0}},
        "probes": {
            "random/conv": {"top1": {"linear": 30.0}},
            "jsd/conv": {"top1": {"linear": 41.5}},
        },
    }
    text = reproduce_cifar10.tables(results)
    lines = text.splitlines()
    assert "| model | linear conv | linear fc | linear y |" in lines
    assert "| random init | 30.0 | - | - |" in lines
    assert "| DIM(L) JSD | 41.5 | - | - |" in lines
    assert "| DIM(L) JSD | 63.25 | 54.06 | 49.62 |" in lines  # the paper's linear SVM
    assert "| DIM(L) JSD | 10 | 0 | 50.0 | 12 |" in lines


def test_reproduce_budget_overrides() -> None:
    args = reproduce_cifar10.parse_args(
        ["--budget", "cpu", "--max-steps", "7", "--mlp-epochs", "3"]
    )
    b = reproduce_cifar10.resolve_budget(args)
    assert (b.max_steps, b.epochs, b.mlp_epochs, b.mi_units) == (7, None, 3, 512)
    # What no option overrides stays the budget's own.
    cpu = reproduce_cifar10.BUDGETS["cpu"]
    assert (b.l2_grid, b.linear_max_iter) == (cpu.l2_grid, cpu.linear_max_iter)
    paper = reproduce_cifar10.resolve_budget(reproduce_cifar10.parse_args(["--budget", "paper"]))
    assert (paper.epochs, paper.mi_units, paper.batch_size) == (1000, 2048, 64)
    assert paper.probe_train_per_class is None


def test_reproduce_rejects_unknown_estimator() -> None:
    with pytest.raises(SystemExit):
        reproduce_cifar10.parse_args(["--estimators", "jsd,mine"])


# ==== each script at a tiny size (slow: each starts processes and trains a few steps) ====


def _run(script: str, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_train_throughput_smoke(cifar_subset: Path) -> None:
    out = _run("train_throughput.py", "--smoke", "--data", str(cifar_subset), "--per-class", "5")
    assert "| mi_units | batch | workers |" in out
    assert "| 64 | 8 |" in out


@pytest.mark.slow
def test_encode_throughput_smoke(cifar_subset: Path) -> None:
    out = _run("encode_throughput.py", "--smoke", "--data", str(cifar_subset))
    assert "| layer | dims | images |" in out
    assert "| y | 64 | 50 |" in out


@pytest.mark.slow
def test_scaling_smoke(cifar_subset: Path) -> None:
    out = _run("scaling.py", "--smoke", "--data", str(cifar_subset))
    assert "| batch | ms/step |" in out and "| images | seconds |" in out
    assert "| 40 |" in out


@pytest.mark.slow
def test_soak_smoke(cifar_subset: Path, tmp_path: Path) -> None:
    out = _run("soak.py", "--smoke", "--data", str(cifar_subset), "--work", str(tmp_path))
    assert "0 failed checks" in out
    assert "| final | resume |" in out


@pytest.mark.slow
def test_reproduce_smoke_writes_results(cifar_subset: Path, tmp_path: Path) -> None:
    results = tmp_path / "r.json"
    out = _run(
        "reproduce_cifar10.py",
        "--smoke",
        "--data",
        str(cifar_subset),
        "--estimators",
        "jsd",
        "--layers",
        "y",
        "--probes",
        "linear,knn",
        "--work",
        str(tmp_path),
        "--results",
        str(results),
    )
    data = json.loads(results.read_text())
    assert set(data["probes"]) == {"random/y", "jsd/y"}
    assert data["runs"]["jsd"]["steps"] == 3
    assert "| DIM(L) JSD |" in out
