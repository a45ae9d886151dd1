"""Tests of dimcli.distributed: DDP training with global negatives, sharded data, launch, encode.

Processes are real: two gloo processes on the CPU, started with torch.multiprocessing (library
level) or with `dim ... --nproc-per-node 2` and torchrun (command level).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dimcli import distributed
from dimcli.distributed import (
    DistContext,
    RoundRobinBatches,
    global_local_mi,
    option_args,
    process_device,
    split_batch,
    wrap_models,
)
from dimcli.errors import UsageError
from dimcli.models import DIMModel, PriorDiscriminator, build_encoder, discriminator_loss
from dimcli.objectives import ESTIMATORS, local_mi, local_mi_rows

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quiet_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: one thread each (two processes on shared cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIM_")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", NO_COLOR="1", **extra)
    return env


# ==== library level: one DDP step in two processes vs one process on the whole batch ====

N_PER_RANK = 4
UNEVEN = (3, 5)  # rows per rank for the uneven-gather check


def small_model(estimator: str) -> DIMModel:
    torch.manual_seed(0)
    encoder = build_encoder("conv32", feature_dim=16)
    return DIMModel(encoder, estimator=estimator, alpha=0.5, beta=1.0, gamma=0.1, mi_units=32)


def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * N_PER_RANK, 3, 32, 32, generator=g)


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    n = sum(UNEVEN)
    return torch.randn(n, 8, 3, 3, generator=g), torch.randn(n, 8, generator=g)


def single_process(estimator: str) -> dict[str, Any]:
    """Loss, terms and gradients of one process on the whole batch (BatchNorm in eval mode)."""
    model = small_model(estimator).eval()
    torch.manual_seed(3)
    disc = PriorDiscriminator(16)
    out = model(batch(), discriminator=disc)
    out.total.backward()
    return {
        "total": out.total.item(),
        "terms": {k: v.item() for k, v in out.terms.items()},
        "estimates": {k: v.item() for k, v in out.estimates.items()},
        "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
    }


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    ctx = DistContext(rank=rank, world_size=WORLD, device=torch.device("cpu"))
    results: dict[str, Any] = {}
    for estimator in ESTIMATORS:
        model = small_model(estimator).eval()
        torch.manual_seed(3)
        disc = PriorDiscriminator(16)
        dim_ddp, disc_ddp = wrap_models(model, disc, ctx, negatives="global")
        assert disc_ddp is not None
        mine = batch()[rank * N_PER_RANK : (rank + 1) * N_PER_RANK]
        # Two full steps: a reducer left waiting by the first would fail the second.
        for step in range(2):
            model.zero_grad(set_to_none=True)
            disc.zero_grad(set_to_none=True)
            out = dim_ddp(mine, discriminator=disc)
            out.total.backward()
            if step == 0:
                results[estimator] = {
                    "total": out.total.item(),
                    "terms": {k: v.item() for k, v in out.terms.items()},
                    "estimates": {k: v.item() for k, v in out.estimates.items()},
                    "grads": {
                        k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None
                    },
                    "disc_untouched": all(p.grad is None for p in disc.parameters()),
                }
            assert out.y is not None
            disc_loss = discriminator_loss(disc_ddp, out.y, gp_weight=1.0)
            disc_loss.backward()
            if step == 0:
                results[estimator]["disc_grads"] = [p.grad.clone() for p in disc.parameters()]

    # Local negatives: each rank scores its own rows only; DDP still averages the gradients.
    model = small_model("nce").eval()
    torch.manual_seed(3)
    disc = PriorDiscriminator(16)
    dim_ddp, _ = wrap_models(model, disc, ctx, negatives="local")
    out = dim_ddp(batch()[rank * N_PER_RANK : (rank + 1) * N_PER_RANK], discriminator=disc)
    out.total.backward()
    results["local-nce"] = {
        "terms": {k: v.item() for k, v in out.terms.items()},
        "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
    }

    # Uneven rows per rank: the gather pads and drops the padding again.
    local, global_ = embeddings()
    start = sum(UNEVEN[:rank])
    rows = slice(start, start + UNEVEN[rank])
    for estimator in ESTIMATORS:
        loc = local[rows].clone().requires_grad_(True)
        glo = global_[rows].clone().requires_grad_(True)
        loss, estimate = global_local_mi(loc, glo, estimator)
        loss.backward()
        results[f"uneven-{estimator}"] = {
            "loss": loss.item(),
            "estimate": estimate.item(),
            "grads": (loc.grad, glo.grad),
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_global_negatives_match_one_process_on_the_whole_batch(
    ddp_results: list[dict[str, Any]], estimator: str
) -> None:
    ref = single_process(estimator)
    ranks = [r[estimator] for r in ddp_results]

    # The mean over ranks of each loss term and estimate is the whole batch's.
    for name, value in ref["terms"].items():
        got = sum(r["terms"][name] for r in ranks) / WORLD
        assert got == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, value in ref["estimates"].items():
        got = sum(r["estimates"][name] for r in ranks) / WORLD
        assert got == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert sum(r["total"] for r in ranks) / WORLD == pytest.approx(ref["total"], rel=1e-5)

    # After DDP's average every rank holds the single-process gradient of every parameter.
    assert set(ranks[0]["grads"]) == set(ref["grads"])
    for name, grad in ref["grads"].items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # The encoder's step leaves the discriminator alone; the discriminator's DDP agrees.
    assert all(r["disc_untouched"] for r in ranks)
    for a, b in zip(ranks[0]["disc_grads"], ranks[1]["disc_grads"], strict=True):
        torch.testing.assert_close(a, b)


def test_local_negatives_score_each_process_against_its_own_rows(
    ddp_results: list[dict[str, Any]],
) -> None:
    # One process per half of the batch, each on its own: what --negatives local computes.
    halves = []
    for rank in range(WORLD):
        model = small_model("nce").eval()
        torch.manual_seed(3)
        disc = PriorDiscriminator(16)
        out = model(batch()[rank * N_PER_RANK : (rank + 1) * N_PER_RANK], discriminator=disc)
        out.total.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        halves.append(({k: v.item() for k, v in out.terms.items()}, grads))

    for rank, result in enumerate(r["local-nce"] for r in ddp_results):
        terms, _ = halves[rank]
        assert result["terms"] == pytest.approx(terms, rel=1e-5, abs=1e-6)
        # Gradients: DDP's average of the two halves' own gradients, on every rank.
        for name, grad in result["grads"].items():
            mean = (halves[0][1][name] + halves[1][1][name]) / WORLD
            torch.testing.assert_close(grad, mean, rtol=1e-4, atol=1e-6, msg=name)
    # Scoring against fewer negatives gives a different local term than global negatives.
    glob = sum(r["nce"]["terms"]["local"] for r in ddp_results) / WORLD
    loc = sum(r["local-nce"]["terms"]["local"] for r in ddp_results) / WORLD
    assert abs(glob - loc) > 1e-3


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_global_negatives_with_uneven_batches(
    ddp_results: list[dict[str, Any]], estimator: str
) -> None:
    local, global_ = embeddings()
    local.requires_grad_(True)
    global_.requires_grad_(True)
    loss, estimate = local_mi(local, global_, estimator, kernel="reference")
    loss.backward()
    ranks = [r[f"uneven-{estimator}"] for r in ddp_results]
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(loss.item(), rel=1e-5)
    assert sum(r["estimate"] for r in ranks) / WORLD == pytest.approx(estimate.item(), rel=1e-5)
    # Rank r's gradients, averaged like DDP does, are the single-process ones of its rows.
    assert local.grad is not None and global_.grad is not None
    start = 0
    for n, r in zip(UNEVEN, ranks, strict=True):
        grad_local, grad_global = r["grads"]
        torch.testing.assert_close(
            grad_local / WORLD, local.grad[start : start + n], rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(
            grad_global / WORLD, global_.grad[start : start + n], rtol=1e-4, atol=1e-7
        )
        start += n


# ==== pieces that need no second process ====


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_local_mi_rows_blocks_rebuild_the_whole_batch(estimator: str) -> None:
    local, global_ = embeddings()
    whole = local_mi_rows(local, global_, 0, estimator)
    parts = [local_mi_rows(local, global_[s : s + 3], s, estimator, chunk=2) for s in (0, 3, 6)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole[0])
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), whole[1])


def test_local_mi_rows_rejects_rows_outside_the_batch() -> None:
    local, global_ = embeddings()
    with pytest.raises(ValueError, match="outside a batch of 8"):
        local_mi_rows(local, global_[:3], 6, "jsd")


def test_single_process_context_does_nothing() -> None:
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main
    assert ctx.on_main(lambda: 7) == 7
    assert ctx.any(True, False) == [True, False]
    assert ctx.reduce_meter({"loss": 2.0}, 5, 0.5) == ({"loss": 2.0}, 5, 0.5)
    assert ctx.gather_to_main("x") == ["x"]
    assert ctx.rank_seed(11) == 11


def test_round_robin_batches_cover_the_folder_once_in_order() -> None:
    size, b, world = 23, 4, 3  # 6 batches, the last one of 3 images
    shards = [list(RoundRobinBatches(size, b, r, world)) for r in range(world)]
    assert [len(RoundRobinBatches(size, b, r, world)) for r in range(world)] == [8, 8, 7]
    # Round k: rank r holds batch k * world + r; in rank order the rounds give 0 .. size - 1.
    order: list[int] = []
    for k in range(2):
        for shard in shards:
            order += shard[k * b : (k + 1) * b]
    assert order == list(range(size))


def test_split_batch() -> None:
    assert split_batch(64, 4) == 16
    with pytest.raises(UsageError, match="does not split evenly over 3 processes"):
        split_batch(64, 3)
    with pytest.raises(UsageError, match="leaves 1 image per process"):
        split_batch(4, 4)


def test_process_device_errors() -> None:
    assert process_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(UsageError, match="names one GPU, but every process needs its own"):
        process_device("cuda:1", 0)
    with pytest.raises(UsageError, match="cannot be shared by several processes"):
        process_device("mps", 0)
    if not torch.cuda.is_available():
        assert process_device("auto", 3) == torch.device("cpu")
        with pytest.raises(UsageError, match="torch sees no CUDA device"):
            process_device("cuda", 0)


def test_sync_bn_needs_cuda_and_negatives_are_checked() -> None:
    ctx = DistContext(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(UsageError, match="--sync-bn needs CUDA GPUs"):
        wrap_models(small_model("jsd"), None, ctx, sync_bn=True)
    with pytest.raises(UsageError, match="--negatives must be global or local"):
        wrap_models(small_model("jsd"), None, ctx, negatives="both")


def test_option_args() -> None:
    args = option_args(
        {"batch_size": "8", "alpha": -1.0, "compile": False, "quiet": True, "x": None}
    )
    assert args == ["--batch-size=8", "--alpha=-1.0", "--no-compile", "--quiet"]


def test_in_worker_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.in_worker() and distributed.is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "3")
    assert distributed.in_worker() and not distributed.is_main_process()


# ==== command level: processes started by torchrun's launcher ====


def dim(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m dimcli ARGS` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "dimcli", *map(str, args)],
        cwd=cwd,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_pngs(root: Path, n: int) -> Path:
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


TRAIN_ARGS = (
    "--batch-size", "8", "--feature-dim", "16", "--mi-units", "32", "--workers", "0",
    "--device", "cpu", "--log-every", "1", "--save-every", "2",
)  # fmt: skip


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`dim train --nproc-per-node 2` for 3 steps (16 images, global batch 8: 2 per epoch)."""
    root = tmp_path_factory.mktemp("train2")
    images = write_pngs(root / "images", 16)
    proc = dim("train", images, *TRAIN_ARGS, "--max-steps", "3", "--nproc-per-node", "2", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root, proc.stdout


def test_train_in_two_processes_writes_one_run_folder(two_process_run: tuple[Path, str]) -> None:
    from dimcli.checkpoint import load_checkpoint
    from dimcli.modelfile import load_encoder

    root, stdout = two_process_run
    # The default (timestamped) name is rank 0's: both processes used one folder.
    runs = [p for p in (root / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1, runs
    run = runs[0]
    assert (root / "runs" / "latest").resolve() == run.resolve()

    # Rank 0 alone prints: one progress line per step.
    assert [line.split(" | ")[0] for line in stdout.splitlines() if line.startswith("step ")] == [
        "step 1",
        "step 2",
        "step 3",
    ]
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    assert config["settings"]["negatives"] == "global"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3]
    # Logged images/s counts both processes' images: 8 per step, not 4.
    assert all(r["images_per_s"] > 0 for r in steps)

    loaded = load_encoder(run / "encoder.safetensors")
    assert loaded.feature_dim("y", "none") == 16
    ckpt = load_checkpoint(run)
    assert ckpt is not None
    assert ckpt.state["progress"]["step"] == 3
    assert ckpt.state["progress"]["epoch"] == 1 and ckpt.state["progress"]["batch_in_epoch"] == 1


def test_two_process_checkpoint_resumes_in_one_process(
    two_process_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dimcli.checkpoint import load_checkpoint
    from dimcli.settings import load_settings
    from dimcli.train import train

    root, _ = two_process_run
    monkeypatch.chdir(root)
    settings = load_settings({"resume": "latest", "max_steps": 5}, environ={})
    result = train(settings, verbosity=-1)
    assert result.resumed_from == 3 and result.steps == 5
    # Step 4 finished epoch 2 (its second global batch), step 5 began epoch 3.
    ckpt = load_checkpoint(result.run_dir)
    assert ckpt is not None
    progress = ckpt.state["progress"]
    assert (progress["step"], progress["epoch"], progress["batch_in_epoch"]) == (5, 2, 1)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["resolved"]["world_size"] == 1


def test_encode_in_two_processes_writes_the_rows_of_one(
    tmp_path: Path, make_image_folder: Callable[..., Path]
) -> None:
    from dimcli.encode import encode_folder
    from dimcli.modelfile import save_encoder

    images = make_image_folder(tmp_path / "images", 23, 32)  # 6 batches of 4, the last of 3
    (images / "class1" / "broken.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    model = tmp_path / "encoder.safetensors"
    preprocessing = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "crop"}
    save_encoder(build_encoder("conv32", feature_dim=16), model, preprocessing=preprocessing)
    one = encode_folder(
        images, tmp_path / "one.npy", model=model, batch_size=4, workers=0, progress=False
    )

    proc = dim(
        "encode", images, "-o", "two.npy", "-m", model, "--batch-size", "4",
        "--workers", "0", "--nproc-per-node", "2", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # One summary line, from rank 0; one warning for the bad file although rank 1 met it.
    assert proc.stdout.count("wrote 23 rows x 16 dims") == 1, proc.stdout
    assert proc.stderr.count("broken.png") == 1, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"))
    for suffix in (".index.csv", ".skipped.txt"):
        assert (tmp_path / f"two{suffix}").read_text() == (tmp_path / f"one{suffix}").read_text()
    assert one.n_rows == 23 and one.n_skipped == 1

    # A user error: one line from rank 0, the exit code of the error, no traceback.
    again = dim(
        "encode", images, "-o", "two.npy", "-m", model, "--nproc-per-node", "2", cwd=tmp_path
    )
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        "error: output two.npy already exists; pass --overwrite to replace it or choose another -o"
    ]
