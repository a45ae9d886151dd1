"""Tests for dimcli/train.py and `dim train`: runs, run folders, resume, faults, CLI errors.

Runs are tiny (conv32 with 16 critic units, batches of 4, a few steps, no workers) so each test
takes seconds on a CPU. Subprocess tests (signals, kill -9) are few; torch.compile is marked slow.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from dimcli import checkpoint, data
from dimcli import train as train_mod
from dimcli.checkpoint import load_checkpoint
from dimcli.cli import app
from dimcli.errors import DimError, NonFiniteLossError, UsageError
from dimcli.modelfile import load_encoder
from dimcli.models import build_encoder
from dimcli.settings import TrainSettings, load_settings
from dimcli.train import (
    EpochSampler,
    TrainResult,
    resolve_device,
    resolve_precision,
    resolve_run_dir,
    train,
    update_latest,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "encoder": "conv32",
    "mi_units": 16,
    "batch_size": 4,
    "workers": 0,
    "epochs": 1,
    "log_every": 1,
    "device": "cpu",
    "precision": "fp32",
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: on a small shared machine, spinning OpenMP threads slow runs down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings(images: Path | None, out: Path | None, **kw: Any) -> TrainSettings:
    values: dict[str, Any] = {**TINY, "images": images, "out": out, **kw}
    return load_settings(values, environ={})


def _run(images: Path | None, out: Path | None, **kw: Any) -> TrainResult:
    return train(_settings(images, out, **kw), console=Console(quiet=True))


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def images(tmp_path: Path, make_image_folder: Callable[..., Path]) -> Path:
    """16 random 32x32 PNGs in two class folders."""
    return make_image_folder(tmp_path / "images", 16, 32)


# ==== a run, end to end ====


def test_run_writes_a_complete_run_folder(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run(images, out)
    assert (result.steps, result.epochs, result.run_dir) == (4, 1, out)
    assert result.interrupted is None and result.skipped_images == 0
    for name in ("encoder.safetensors", "config.json", "metrics.jsonl", "checkpoint"):
        assert (out / name).exists(), name
    assert not (out / "skipped.txt").exists()

    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["batch_size"] == 4
    assert config["settings"]["images"] == str(images.absolute())
    assert config["resolved"]["image_size"] == 32 and config["resolved"]["gamma"] == 0.1
    assert config["versions"]["torch"] == torch.__version__
    assert config["git_sha"] == train_mod._git_sha()  # dimcli's commit, or None

    # The model file rebuilds the encoder with the trained weights: equal outputs.
    loaded = load_encoder(out)
    ckpt = load_checkpoint(out)
    assert ckpt is not None
    fresh = build_encoder("conv32")
    fresh.load_state_dict(
        {
            k.removeprefix("encoder."): v
            for k, v in ckpt.state["model"].items()
            if k.startswith("encoder.")
        }
    )
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for layer in ("conv", "fc", "y"):
            torch.testing.assert_close(loaded.module(x)[layer], fresh(x)[layer], rtol=0, atol=0)
    prep = loaded.metadata["preprocessing"]
    assert prep["image_size"] == 32 and prep["mean"] == [0.5] * 3 and prep["std"] == [0.5] * 3
    assert loaded.metadata["training"]["steps"] == 4
    assert loaded.metadata["training"]["settings"]["mi_units"] == 16
    # The last logged metrics, not those of an earlier save at the same step.
    assert result.final and loaded.metadata["training"]["final"] == result.final


def test_metrics_lines_have_the_documented_keys(images: Path, tmp_path: Path) -> None:
    result = _run(images, tmp_path / "run", preset="dim-lg")
    records = _metrics(result.run_dir)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and len(epochs) == 1
    for rec in records:
        for key in ("step", "epoch", "time", "images_per_s", "data_wait", "lr", "loss_total"):
            assert key in rec, key
        for key in (
            "loss_global",
            "loss_local",
            "loss_prior",
            "loss_disc",
            "mi_global",
            "mi_local",
        ):
            assert key in rec, key
        assert 0.0 <= rec["data_wait"] <= 1.0
    # The total is the weighted sum of the terms (DIM(L+G): 0.5, 0.1, 0.1).
    rec = steps[0]
    expected = 0.5 * rec["loss_global"] + 0.1 * rec["loss_local"] + 0.1 * rec["loss_prior"]
    assert rec["loss_total"] == pytest.approx(expected, rel=1e-5)


def test_dim_g_without_local_term_logs_only_present_terms(images: Path, tmp_path: Path) -> None:
    result = _run(images, tmp_path / "run", preset="dim-g", gamma=0.0, max_steps=1)
    rec = _metrics(result.run_dir)[0]
    assert "loss_global" in rec and "mi_global" in rec
    assert not {"loss_local", "mi_local", "loss_prior", "loss_disc"} & rec.keys()
    assert load_checkpoint(result.run_dir).state["disc"] is None  # type: ignore[union-attr]


def test_run_on_real_cifar_images(cifar_subset: Path, tmp_path: Path) -> None:
    result = _run(cifar_subset / "train", tmp_path / "run", batch_size=8, max_steps=3)
    assert result.steps == 3
    loaded = load_encoder(result.run_dir)
    with torch.no_grad():
        y = loaded.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert y.shape == (2, 64) and torch.isfinite(y).all()


def test_loss_goes_down_on_a_tiny_folder(
    tmp_path: Path, make_image_folder: Callable[..., Path]
) -> None:
    folder = make_image_folder(tmp_path / "few", 40, 32)
    result = _run(
        folder,
        tmp_path / "run",
        batch_size=4,
        epochs=4,
        lr=1e-3,
        preset="dim-l",
        gamma=0.0,
        seed=3,
    )
    losses = [r["loss_local"] for r in _metrics(result.run_dir) if r["kind"] == "step"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)  # about 3.7 -> 1.5 with this seed


@pytest.mark.slow
def test_loss_goes_down_over_hundreds_of_steps_on_cifar(cifar_subset: Path, tmp_path: Path) -> None:
    result = _run(
        cifar_subset / "train", tmp_path / "run", batch_size=16, mi_units=256, epochs=12, seed=0
    )
    local = [r["loss_local"] for r in _metrics(result.run_dir) if r["kind"] == "step"]
    assert len(local) == 300
    assert sum(local[-25:]) / 25 < sum(local[:25]) / 25 - 0.05


def test_terminal_gets_a_progress_bar_and_greppable_lines(images: Path, tmp_path: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    train(_settings(images, tmp_path / "run", max_steps=2), console=console)
    text = buffer.getvalue()
    assert "training conv32 dim-l (alpha 0, beta 1, gamma 0.1) jsd" in text
    assert "step 2 | epoch 1 | loss_disc " in text and "| img/s " in text and "| data " in text
    assert "2/2" in text  # the bar's step counter
    assert "run folder" in text  # the summary table


def test_quiet_prints_only_the_model_path(images: Path, tmp_path: Path) -> None:
    buffer = io.StringIO()
    result = train(
        _settings(images, tmp_path / "run", max_steps=1),
        console=Console(file=buffer, width=200),
        verbosity=-1,
    )
    assert buffer.getvalue() == f"saved {result.model_path}\n"


def test_bf16_autocast_step_runs_on_cpu(images: Path, tmp_path: Path) -> None:
    result = _run(images, tmp_path / "run", precision="bf16", channels_last=True, max_steps=2)
    assert result.steps == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final.values())


def test_train_step_moves_both_players(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = _settings(None, None)
    run = train_mod._Run(s, tmp_path, torch.device("cpu"), "fp32", False, 0)
    models, opts = train_mod._build(run)
    assert models.disc is not None and opts.disc is not None
    disc_ids = {id(p) for p in models.disc.parameters()}
    assert not disc_ids & {id(p) for g in opts.model.param_groups for p in g["params"]}
    before_enc = [p.detach().clone() for p in models.dim.encoder.parameters()]
    before_disc = next(models.disc.parameters()).detach().clone()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    cfg = train_mod.StepConfig(torch.device("cpu"), None, False, 0.0)
    out = train_mod.train_step(models, opts, images, cfg)
    assert out.bad == []
    assert out.values["loss_total"] == pytest.approx(
        out.values["loss_local"] + 0.1 * out.values["loss_prior"], rel=1e-5
    )
    after_enc = list(models.dim.encoder.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before_enc, after_enc, strict=True))
    assert not torch.equal(before_disc, next(models.disc.parameters()))


# ==== run folder: --out, latest ====


def test_existing_non_empty_out_is_refused(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(
        UsageError,
        match=f"run folder {out} already exists and is not empty; "
        f"continue it with --resume {out}, or pick another --out",
    ):
        _run(images, out)


def test_default_out_and_latest_symlink(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = _run(images, None, max_steps=1)
    assert first.run_dir.parent == Path("runs")
    link = Path("runs/latest")
    assert link.is_symlink() and os.readlink(link) == first.run_dir.name  # relative
    second = _run(images, None, max_steps=1)
    assert second.run_dir != first.run_dir
    assert os.readlink(link) == second.run_dir.name
    assert resolve_run_dir("latest") == second.run_dir
    assert load_encoder("runs/latest").metadata["training"]["steps"] == 1


def test_latest_falls_back_to_a_text_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = Path("runs/20240101-000000")
    run.mkdir(parents=True)

    def no_symlinks(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "symlinks not supported")

    monkeypatch.setattr(train_mod.os, "symlink", no_symlinks)
    update_latest(run)
    assert Path("runs/LATEST").read_text() == "20240101-000000\n"
    assert resolve_run_dir("latest") == run
    assert resolve_run_dir("runs/latest") == run


def test_resume_latest_without_runs_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no run to resume: runs/latest does not exist"):
        resolve_run_dir("latest")
    with pytest.raises(UsageError, match="cannot resume nowhere: no such run folder"):
        resolve_run_dir("nowhere")


# ==== resume ====


def test_sampler_skips_consumed_batches_without_reordering() -> None:
    sampler = EpochSampler(20, batch_size=4, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    assert sorted(full) == list(range(20))
    sampler.set_epoch(3, start_batch=2)
    assert list(sampler) == full[8:] and len(sampler) == 12
    sampler.set_epoch(4)
    assert list(sampler) != full  # a new order each epoch
    assert list(EpochSampler(20, batch_size=4, seed=8).order(3)) != full


def test_sampler_drops_the_incomplete_last_batch() -> None:
    sampler = EpochSampler(22, batch_size=4, seed=7)
    assert len(list(sampler)) == len(sampler) == 20
    assert list(sampler) == sampler.order(0)[:20].tolist()


@pytest.mark.parametrize("start_batch", [0, 3])
def test_process_slices_of_each_batch_make_the_single_process_batch(start_batch: int) -> None:
    one = EpochSampler(26, batch_size=6, seed=3)
    one.set_epoch(2, start_batch)
    parts = [EpochSampler(26, batch_size=6, seed=3, rank=r, world_size=3) for r in range(3)]
    for part in parts:
        part.set_epoch(2, start_batch)
    slices = [list(part) for part in parts]
    for part, indices in zip(parts, slices, strict=True):
        assert len(indices) == len(part) == (4 - start_batch) * 2
    # Global batch b is rank 0's b-th pair, then rank 1's, then rank 2's.
    rebuilt = [i for b in range(4 - start_batch) for s in slices for i in s[2 * b : 2 * b + 2]]
    assert rebuilt == list(one)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        EpochSampler(26, batch_size=6, seed=3, world_size=4)


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_resumed_deterministic_run_matches_an_uninterrupted_one(
    images: Path, tmp_path: Path, augment: str
) -> None:
    common = {"deterministic": True, "augment": augment, "seed": 11, "epochs": 3}
    whole = _run(images, tmp_path / "whole", max_steps=6, **common)
    part = _run(images, tmp_path / "part", max_steps=3, **common)
    assert part.steps == 3
    resumed = train(
        load_settings({"resume": str(tmp_path / "part"), "max_steps": 6}, environ={}),
        console=Console(quiet=True),
    )
    assert (whole.steps, resumed.steps, resumed.resumed_from) == (6, 6, 3)
    a = load_checkpoint(whole.run_dir)
    b = load_checkpoint(resumed.run_dir)
    assert a is not None and b is not None
    for part_name in ("model", "disc"):
        for key, value in a.state[part_name].items():
            assert torch.equal(value, b.state[part_name][key]), (part_name, key)
    wa = load_file(str(whole.run_dir / "encoder.safetensors"))
    wb = load_file(str(resumed.run_dir / "encoder.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # metrics.jsonl of the resumed run covers every step once
    steps = [r["step"] for r in _metrics(resumed.run_dir) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_decodes_only_the_remaining_images(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(images, tmp_path / "run", max_steps=3)  # 3 of 4 batches of epoch 1 consumed
    decoded: list[str] = []
    real = data.load_rgb

    def counting(path: Any, *args: Any) -> Any:
        decoded.append(str(path))
        return real(path, *args)

    monkeypatch.setattr(data, "load_rgb", counting)
    result = train(
        load_settings({"resume": str(tmp_path / "run"), "max_steps": 4}, environ={}),
        console=Console(quiet=True),
    )
    assert result.steps == 4
    assert len(decoded) == 1 + 4  # one readability probe, then the last batch of 4 only


def test_resume_rejects_changes_to_the_model(images: Path, tmp_path: Path) -> None:
    _run(images, tmp_path / "run", max_steps=1)
    given = load_settings(
        {"resume": str(tmp_path / "run"), "feature_dim": 32, "estimator": "nce"}, environ={}
    )
    with pytest.raises(
        UsageError,
        match=r"cannot change feature_dim \(run: 64, now: 32\), "
        r"estimator \(run: jsd, now: nce\) when resuming",
    ):
        train(given)
    same = load_settings(
        {"resume": str(tmp_path / "run"), "feature_dim": 64, "lr": 5e-4, "max_steps": 2}, environ={}
    )
    result = train(same, console=Console(quiet=True))
    assert result.steps == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["settings"]["lr"] == 5e-4 and config["settings"]["max_steps"] == 2


def test_resume_extends_epochs_and_finished_run_is_a_no_op(images: Path, tmp_path: Path) -> None:
    _run(images, tmp_path / "run")  # 1 epoch = 4 steps
    again = train(
        load_settings({"resume": str(tmp_path / "run")}, environ={}),
        console=Console(quiet=True),
    )
    assert (again.steps, again.epochs) == (4, 1)
    more = train(
        load_settings({"resume": str(tmp_path / "run"), "epochs": 2}, environ={}),
        console=Console(quiet=True),
    )
    assert (more.steps, more.epochs) == (8, 2)
    epochs = [r["epoch"] for r in _metrics(more.run_dir) if r["kind"] == "epoch"]
    assert epochs == [1, 2]


def test_resume_with_different_out_or_image_count(
    images: Path, tmp_path: Path, make_image_folder: Callable[..., Path]
) -> None:
    _run(images, tmp_path / "run", max_steps=1)
    with pytest.raises(UsageError, match="name different folders"):
        train(
            load_settings({"resume": str(tmp_path / "run"), "out": str(tmp_path / "x")}, environ={})
        )
    bigger = make_image_folder(tmp_path / "bigger", 20, 32)
    with pytest.raises(UsageError, match="now holds 20 images but the run was trained on 16"):
        train(
            load_settings({"resume": str(tmp_path / "run"), "images": str(bigger)}, environ={}),
            console=Console(quiet=True),
        )


def test_resume_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    with pytest.raises(UsageError, match="is not a run folder of `dim train` \\(no config.json\\)"):
        train(load_settings({"resume": str(tmp_path / "junk")}, environ={}))


# ==== faults ====


def _nan_on_call(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Make the `call`-th normalised batch NaN (1-based)."""
    real = data.normalize
    count = {"n": 0}

    def poisoned(images: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
        count["n"] += 1
        x = real(images, mean, std)
        return torch.full_like(x, float("nan")) if count["n"] == call else x

    monkeypatch.setattr(data, "normalize", poisoned)


def test_nan_loss_stops_naming_step_and_term(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on_call(monkeypatch, 3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        _run(images, out, save_every=2)
    message = str(info.value)
    assert message.startswith("non-finite loss at step 3: total = nan, local = nan, prior = nan")
    assert f"the last good checkpoint (step 2) is kept in {out}" in message
    assert "--on-nonfinite skip" in message
    ckpt = load_checkpoint(out)
    assert ckpt is not None and ckpt.state["progress"]["step"] == 2
    assert load_encoder(out).metadata["training"]["steps"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt.state["model"].values() if v.is_floating_point()
    )


def test_nan_loss_skipped_when_asked(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on_call(monkeypatch, 2)
    result = _run(images, tmp_path / "run", on_nonfinite="skip")
    assert (result.steps, result.skipped_steps) == (4, 1)
    records = _metrics(result.run_dir)
    assert records[-1]["skipped_steps"] == 1
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 3, 4]  # step 2 not logged
    weights = load_file(str(result.run_dir / "encoder.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_full_disk_while_training(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = checkpoint._write_bytes
    writes = {"n": 0}

    def fill_up(path: Path, blob: bytes) -> None:
        writes["n"] += 1
        if writes["n"] > 2:  # the first checkpoint (two files) fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, blob)

    monkeypatch.setattr(checkpoint, "_write_bytes", fill_up)
    out = tmp_path / "run"
    with pytest.raises(
        DimError,
        match=f"no space left on device while saving the checkpoint to "
        f"{out / 'checkpoint'}; free space and resume with: dim train --resume {out}",
    ):
        _run(images, out, save_every=1)
    ckpt = load_checkpoint(out)
    assert ckpt is not None and ckpt.state["progress"]["step"] == 1
    monkeypatch.undo()
    resume = load_settings({"resume": str(out), "save_every": 1000}, environ={})
    result = train(resume, console=Console(quiet=True))
    assert (result.steps, result.resumed_from) == (4, 1)


def test_bad_images_are_skipped_and_listed(images: Path, tmp_path: Path) -> None:
    (images / "class0" / "broken.png").write_bytes(b"not a png at all")
    (images / "class1" / "empty.jpg").write_bytes(b"")
    result = _run(images, tmp_path / "run", batch_size=2, epochs=1)
    assert result.skipped_images == 2
    lines = (result.run_dir / "skipped.txt").read_text().splitlines()
    assert lines == ["class0/broken.png\tnot an image", "class1/empty.jpg\tempty file"]


def test_bad_image_fails_when_asked(images: Path, tmp_path: Path) -> None:
    (images / "class0" / "broken.png").write_bytes(b"not a png at all")
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(images),
            "--out",
            str(tmp_path / "run"),
            "--on-bad-image",
            "fail",
            "--batch-size",
            "17",
            "--mi-units",
            "16",
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "error: class0/broken.png: not an image; fix or remove it, or use --on-bad-image skip\n"
    )


# ==== interruption ====


def _signal_after(monkeypatch: pytest.MonkeyPatch, steps: int, signum: int) -> None:
    real = train_mod.train_step
    count = {"n": 0}

    def step_then_signal(*args: Any) -> Any:
        out = real(*args)
        count["n"] += 1
        if count["n"] == steps:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_exits_with_128_plus_signal(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int, code: int
) -> None:
    _signal_after(monkeypatch, 2, signum)
    out = tmp_path / "run"
    argv = [
        "train",
        str(images),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--mi-units",
        "16",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--epochs",
        "3",
        "-q",
    ]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == code, result.output
    assert result.stderr.endswith(f"interrupted at step 2; resume with: dim train --resume {out}\n")
    ckpt = load_checkpoint(out)
    assert ckpt is not None and ckpt.state["progress"]["step"] == 2
    assert load_encoder(out).metadata["training"]["steps"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ==== CLI errors ====


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        ([], 2, "error: no image folder given; pass one: dim train IMAGES"),
        (["{tmp}/missing"], 1, "error: image folder {tmp}/missing does not exist"),
        (["{tmp}/empty"], 1, "error: no image files in {tmp}/empty"),
        (["{tmp}/unreadable"], 1, "error: no readable image in {tmp}/unreadable"),
        (
            ["{images}", "--batch-size", "32"],
            2,
            "error: 16 images in {images} but the batch size is 32; lower --batch-size to at most",
        ),
        (["{images}", "--resume", "{tmp}/nope"], 2, "error: cannot resume {tmp}/nope: no such run"),
        (["{images}", "--config", "{tmp}/nope.toml"], 2, "error: config file not found"),
        (
            ["{images}", "--image-size", "48"],
            2,
            "error: image_size: encoder conv32 takes image size",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_code(
    images: Path, tmp_path: Path, args: list[str], code: int, expected: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "a.png").write_bytes(b"junk")
    subs = {"tmp": str(tmp_path), "images": str(images)}
    argv = [
        "train",
        *(a.format(**subs) for a in args),
        "--out",
        str(tmp_path / "run"),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--mi-units",
        "16",
    ]
    result = CliRunner().invoke(app, argv, env={})
    assert result.exit_code == code, result.output
    assert result.stderr.startswith(expected.format(**subs)), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(images: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="device cuda asked for, but torch sees no CUDA device"):
        resolve_device("cuda")
    result = CliRunner().invoke(
        app, ["train", str(images), "--device", "cuda:1", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: device cuda:1 asked for, but torch sees no CUDA")
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_requested_without_mps() -> None:
    with pytest.raises(UsageError, match="device mps asked for, but torch sees no Apple Metal"):
        resolve_device("mps")


def test_device_and_precision_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == cpu
    expected_auto = "bf16" if train_mod.CPU_AUTO_BF16 and train_mod.cpu_supports_bf16() else "fp32"
    assert resolve_precision("auto", cpu) == expected_auto
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"


def test_auto_precision_on_a_cpu_follows_its_bf16_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512bw\n\n")
    assert train_mod._cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512f", "avx512bw"}
    assert train_mod._cpu_flags(tmp_path / "absent") is None

    cpu = torch.device("cpu")
    for flags, expected in [
        ({"avx512bw"}, "fp32"),
        ({"avx512_bf16"}, "bf16"),
        ({"amx_bf16"}, "bf16"),
    ]:
        monkeypatch.setattr(train_mod, "_cpu_flags", lambda *a, f=flags: f)
        assert train_mod.cpu_supports_bf16() is (expected == "bf16")
        assert resolve_precision("auto", cpu) == expected
        assert resolve_precision("fp32", cpu) == "fp32"  # an explicit choice always wins


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    dim = Path(sys.executable).parent / "dim"
    if not dim.exists():
        pytest.skip(f"console script not installed at {dim}")
    proc = subprocess.run(
        [str(dim), "train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: image folder {tmp_path / 'missing'} does not exist; "
        "pass a folder that contains images\n"
    )
    assert "Traceback" not in proc.stderr


# ==== subprocess: signals and hard kills ====

_FAST = [
    "--batch-size",
    "4",
    "--mi-units",
    "16",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--log-every",
    "1",
    "--save-every",
    "2",
    "-q",
]


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dimcli", "train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_steps(proc: subprocess.Popen[str], metrics: Path, steps: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("training made no progress in 240 s")


def test_sigterm_saves_then_resume_finishes(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start([str(images), "--out", str(out), "--epochs", "1000", *_FAST], tmp_path)
    _wait_for_steps(proc, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith(
        f"; resume with: dim train --resume {out}"
    )
    stopped_at = int(last.split()[3].rstrip(";"))
    ckpt = load_checkpoint(out)
    assert ckpt is not None and ckpt.state["progress"]["step"] == stopped_at

    again = _start(["--resume", str(out), "--max-steps", str(stopped_at + 2), "-q"], tmp_path)
    _, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    assert load_encoder(out).metadata["training"]["steps"] == stopped_at + 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_random_points_leaves_a_resumable_run(
    images: Path, tmp_path: Path, seed: int
) -> None:
    out = tmp_path / "run"
    proc = _start(
        [str(images), "--out", str(out), "--epochs", "1000", "--save-every", "1", *_FAST], tmp_path
    )
    _wait_for_steps(proc, out / "metrics.jsonl", 1)
    time.sleep(random.Random(seed).uniform(0.0, 3.0))
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    # Whatever the kill interrupted, what is there loads; before the first save there is
    # no checkpoint yet and --resume starts the run from step 0 in the same folder.
    ckpt = load_checkpoint(out)
    step = 0 if ckpt is None else ckpt.state["progress"]["step"]
    again = _start(["--resume", str(out), "--max-steps", str(step + 2), "-q"], tmp_path)
    _, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    assert load_encoder(out).metadata["training"]["steps"] == step + 2


# ==== bare --resume ====


def _steps(run_dir: Path) -> int:
    return int(load_encoder(run_dir).metadata["training"]["steps"])


def test_bare_resume_continues_the_latest_run(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    older = _run(images, None, max_steps=1).run_dir
    newest = _run(images, None, max_steps=1).run_dir
    runner = CliRunner()
    # `--resume` alone, followed by other options or at the end: the latest run.
    for argv, steps in (
        (["train", "--resume", "--max-steps", "2", "-q"], 2),
        (["train", "--max-steps", "3", "-q", "--resume"], 3),
    ):
        result = runner.invoke(app, argv, env={})
        assert result.exit_code == 0, result.output
        assert _steps(newest) == steps, argv
    # DIM_RESUME=latest, as before.
    result = runner.invoke(app, ["train", "--max-steps", "4", "-q"], env={"DIM_RESUME": "latest"})
    assert result.exit_code == 0, result.output
    assert _steps(newest) == 4
    assert _steps(older) == 1  # untouched


@pytest.mark.parametrize(
    ("args", "resume"),
    [
        (["--resume"], "latest"),
        (["--resume", "--print-config"], "latest"),
        (["--resume", "LATEST"], "latest"),
        (["--resume", "runs/x"], "runs/x"),
        (["--resume=runs/x"], "runs/x"),
        (["--resume", "-"], "-"),
        (["--out", "--resume"], None),  # the value of --out, not the option
        (["--", "--resume"], None),  # after --, a word is IMAGES
        ([], None),
    ],
)
def test_resume_value_is_optional(args: list[str], resume: str | None) -> None:
    result = CliRunner().invoke(app, ["train", "--print-config", *args], env={})
    assert result.exit_code == 0, result.output
    expected = f'resume = "{resume}"' if resume else "# resume: not set (automatic default)"
    assert expected in result.stdout.splitlines()


def test_bare_resume_without_runs_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--resume"], env={})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no run to resume: runs/latest does not exist")
    assert result.stderr.count("\n") == 1


# ==== git sha of dimcli in config.json ====


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    )
    return done.stdout.strip()


def _other_repo(path: Path) -> str:
    """A git repository with one commit at `path`; returns its commit."""
    path.mkdir(parents=True)
    _git("init", "-q", cwd=path)
    (path / "README").write_text("someone else's project\n")
    _git("add", "README", cwd=path)
    _git("commit", "-q", "-m", "first", cwd=path)
    return _git("rev-parse", "HEAD", cwd=path)


def _has_git() -> bool:
    import shutil

    return shutil.which("git") is not None


_NO_GIT = not _has_git()


@pytest.mark.skipif(_NO_GIT, reason="git is not installed")
def test_git_sha_is_dimcli_s_commit_not_the_current_folder_s(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout")
    if Path(train_mod.__file__).resolve().parents[1] != REPO:
        pytest.skip("dimcli is not imported from this checkout")
    before = _git("rev-parse", "HEAD", cwd=REPO)
    project = tmp_path / "project"
    theirs = _other_repo(project)
    monkeypatch.chdir(project)  # a run started inside someone else's repository
    result = _run(images, project / "run", max_steps=1)
    after = _git("rev-parse", "HEAD", cwd=REPO)  # someone may commit meanwhile
    sha = json.loads((result.run_dir / "config.json").read_text())["git_sha"]
    assert sha in (before, after) and sha != theirs


@pytest.mark.skipif(_NO_GIT, reason="git is not installed")
def test_git_sha_is_none_for_an_installed_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy of dimcli that no repository tracks: in a .venv inside a repository, or anywhere.
    project = tmp_path / "project"
    _other_repo(project)
    (project / ".gitignore").write_text(".venv/\n")
    for site in (project / ".venv" / "site-packages", tmp_path / "site-packages"):
        fake = site / "dimcli" / "train.py"
        fake.parent.mkdir(parents=True)
        fake.write_text("")
        monkeypatch.setattr(train_mod, "__file__", str(fake))
        assert train_mod._git_sha() is None, site


@pytest.mark.skipif(_NO_GIT, reason="git is not installed")
def test_git_sha_of_a_tracked_copy_is_its_repository_s_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "checkout"
    _other_repo(repo)
    fake = repo / "dimcli" / "train.py"
    fake.parent.mkdir()
    fake.write_text("")
    _git("add", "dimcli/train.py", cwd=repo)
    _git("commit", "-q", "-m", "dimcli", cwd=repo)
    monkeypatch.setattr(train_mod, "__file__", str(fake))
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))  # ignored: not dimcli's repo
    assert train_mod._git_sha() == _git("rev-parse", "HEAD", cwd=repo)


@pytest.mark.slow  # torch.compile builds C++ kernels first: tens of seconds on 2 cores
def test_compiled_run_trains_and_saves_a_plain_model_file(images: Path, tmp_path: Path) -> None:
    compiled = _run(images, tmp_path / "compiled", compile=True, max_steps=3, seed=5)
    eager = _run(images, tmp_path / "eager", max_steps=3, seed=5)
    assert compiled.steps == eager.steps == 3
    assert all(math.isfinite(v) for v in compiled.final.values())
    # The model file holds the encoder's own parameter names, so it loads without compile.
    a, b = load_encoder(compiled.model_path), load_encoder(eager.model_path)
    assert a.module.state_dict().keys() == b.module.state_dict().keys()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.isfinite(a.encode(x)).all()
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert config["settings"]["compile"] is True
