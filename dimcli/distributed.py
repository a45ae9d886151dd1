"""Multi-process training and encoding on torch.distributed, started by torchrun.

`dim train` and `dim encode` run unchanged as one process per GPU (or several CPU processes):

    torchrun --nproc-per-node 4 -m dimcli train IMAGES ...        # or:
    dim train IMAGES --nproc-per-node 4                             # starts the same launcher

torchrun describes the job in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...);
`setup` joins that process group (nccl on CUDA, gloo on CPU) and gives each process its device,
cuda:LOCAL_RANK. With W processes:

- `--batch-size` is the global batch. Each process takes batch_size / W images of every global
  batch: its contiguous slice of the epoch's permutation (`dimcli.train.EpochSampler`), so the
  per-process batches, concatenated in rank order, are the single-process batch.
- The DIM model (encoder + critics) and the prior discriminator are two players with their own
  optimisers and steps, so each gets its own DistributedDataParallel wrapper (`wrap_models`);
  DDP averages their gradients over processes.
- Global negatives (`GlobalNegatives`, the default): every process scores its own global vectors
  against the local embeddings of the whole global batch, gathered with gradients. Loss and
  gradients equal those of one process on the whole batch (see `global_local_mi`).
- Rank 0 alone writes files and prints; logged metrics are averaged over processes only at log
  intervals (`DistContext.reduce_meter`).

`dim encode` deals batches out in turn (batch j to rank j mod W); after each round rank 0
gathers the rows and writes them in folder order (`encode_rounds`), so memory stays constant.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from dimcli.errors import DimError, UsageError
from dimcli.models import DIMModel
from dimcli.objectives import ESTIMATORS, local_mi_rows

T = TypeVar("T")
Negatives = Literal["global", "local"]
NEGATIVES: tuple[str, ...] = get_args(Negatives)

# Variables torchrun sets in every process it starts.
_WORKER_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")


# ==== where this process stands ====


def in_worker() -> bool:
    """Whether torchrun (or `launch`) started this process as one of a job's workers."""
    return any(name in os.environ for name in _WORKER_VARS)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain single process: the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class DistContext:
    """This process's place in the job; a single process when `world_size` is 1.

    Attributes:
        rank, world_size, local_rank: as torchrun numbers them.
        device: the process's device (None for a single process: the caller resolves --device).
        cpu_group: the group for Python objects and host-side flags (gloo; with nccl a gloo
            side group, so that pickled objects do not travel through the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    cpu_group: Any = None

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- agreement between processes (each is one small collective) ----

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.cpu_group)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and hand its result, or the DimError it raised, to every rank.

        For work whose answer must be the same everywhere and that only rank 0 may do: naming
        the run folder, checking that an output does not exist, reading a checkpoint.
        """
        if not self.enabled:
            return fn()
        payload: list[Any] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                payload[0] = ("ok", fn())
            except DimError as err:
                payload[0] = ("error", err)
            except Exception as err:
                failure = err
                payload[0] = ("crash", f"{type(err).__name__}: {err}")
        dist.broadcast_object_list(payload, src=0, group=self.cpu_group)
        kind, value = payload[0]
        if failure is not None:
            raise failure
        if kind == "error":
            raise value
        if kind == "crash":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        payload: list[Any] = [value]
        dist.broadcast_object_list(payload, src=0, group=self.cpu_group)
        return payload[0]

    def any(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over all processes, so that every rank takes the same branch."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return [bool(v) for v in t.tolist()]

    def reduce_meter(
        self, sums: Mapping[str, float], images: int, wait: float
    ) -> tuple[dict[str, float], int, float]:
        """A logging interval over all processes: mean of each sum, total images, mean wait.

        Every process has the same keys (the same loss terms); called at log intervals only.
        """
        if not self.enabled:
            return dict(sums), images, wait
        keys = sorted(sums)
        t = torch.tensor([*(sums[k] for k in keys), float(images), wait], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.cpu_group)
        values = (t / self.world_size).tolist()
        return dict(zip(keys, values, strict=False)), round(float(t[-2])), values[-1]

    def raise_first(self, error: DimError | None) -> NoReturn:
        """Raise the lowest rank's error on every rank (all call it once `any` found one).

        For mistakes one rank meets alone (an undecodable image under --on-bad-image fail):
        raised there only, the other ranks would wait for it in their next collective.
        """
        errors = self.all_gather(error)
        raise next(e for e in errors if e is not None)

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's (small) `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    # ---- random streams ----

    def seed_process(self, seed: int, step: int) -> None:
        """Give ranks other than 0 their own random streams (prior samples, augmentation).

        Rank 0 keeps its streams: they are the ones a checkpoint saves, so one process and
        rank 0 of many draw alike. Another rank's streams follow (seed, step, rank), so a
        resumed run draws reproducibly too, whatever the number of processes before.
        """
        if self.rank == 0:
            return
        mixed = int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1)[0])
        torch.manual_seed(mixed)
        np.random.seed(mixed)
        random.seed(mixed)

    def rank_seed(self, seed: int) -> int:
        """`seed` on rank 0, a different seed derived from it on every other rank."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])


# ==== joining the job ====


def setup(device: str = "auto") -> DistContext:
    """Join the process group of the torchrun job this process belongs to.

    A single process (no torchrun, or torchrun with one process) gets a `DistContext` of one
    and no process group. The group is made once per process and kept until it exits, so
    later calls (and a group the caller made) reuse it.

    Args:
        device: --device: auto or cuda (each process takes cuda:LOCAL_RANK), or cpu.

    Raises:
        UsageError: a device that cannot be shared out (cuda:N, mps), more processes on a node
            than it has GPUs, or a torch built without torch.distributed.
    """
    joined = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if joined else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise UsageError(
            "this torch build has no torch.distributed; run one process, without torchrun"
        )
    rank = dist.get_rank() if joined else int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = process_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not joined:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://")
        atexit.register(_leave)
    global _CPU_GROUP
    if _CPU_GROUP is None and dist.get_backend() != "gloo":
        # Python objects and host flags go through gloo, never through a GPU.
        _CPU_GROUP = dist.new_group(backend="gloo")
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=torch_device,
        cpu_group=_CPU_GROUP,
    )


_CPU_GROUP: Any = None


def _leave() -> None:
    global _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def process_device(spec: str, local_rank: int) -> torch.device:
    """The device of process `local_rank` of a node for --device `spec`.

    Raises:
        UsageError: see `setup`.
    """
    spec = spec.strip().lower()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda asked for, but torch sees no CUDA device; use --device cpu "
                "(gloo) or auto"
            )
        count = torch.cuda.device_count()
        if local_rank < count:
            return torch.device("cuda", local_rank)
        if count == 1:
            return torch.device("cuda", 0)  # the launcher gave each process its own GPU
        raise UsageError(
            f"process {local_rank} of this node has no GPU of its own: torch sees {count}; "
            f"start at most {count} processes per node (--nproc-per-node)"
        )
    if spec.startswith("cuda:"):
        raise UsageError(
            f"--device {spec} names one GPU, but every process needs its own; pass --device "
            "cuda (process i of a node takes cuda:i) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    raise UsageError(
        f"--device {spec} cannot be shared by several processes; multi-process runs use CUDA "
        "(nccl) or the CPU (gloo): pass --device cuda, cpu or auto"
    )


# ==== gathering with gradients ====


def _collective(new: str, old: str) -> Callable[..., Any]:
    # torch 2.14 renamed the single-tensor collectives; older versions only have the old names.
    fn: Callable[..., Any] = getattr(dist, new, None) or getattr(dist, old)
    return fn


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's (n, ...) tensor along dim 0, keeping gradients.

    Every rank's loss may use every slice, so the gradient of rank r's slice is the sum over
    ranks of their gradients for it: a reduce-scatter with SUM.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # (W*n, ...)
        _collective("all_gather_single", "all_gather_into_tensor")(out, x.contiguous(), group=group)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))  # (W*n, ...) -> (n, ...)
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(
            out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group
        )
        return out, None


def gather_sizes(n: int, device: torch.device, group: Any = None) -> list[int]:
    """Every rank's row count, in rank order."""
    world = dist.get_world_size(group)
    out = torch.empty(world, dtype=torch.int64, device=device)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    _collective("all_gather_single", "all_gather_into_tensor")(out, mine, group=group)
    return [int(v) for v in out.tolist()]


def gather_rows(x: Tensor, sizes: Sequence[int], group: Any = None) -> Tensor:
    """Every rank's rows x (sizes[rank], ...) concatenated in rank order, with gradients.

    Ranks may hold different numbers of rows (images that failed to decode): they are padded
    to the largest for the collective and the padding is dropped again.
    """
    top = max(sizes)
    n = x.shape[0]
    if n < top:
        x = torch.cat([x, x.new_zeros((top - n, *x.shape[1:]))])  # (n, ...) -> (top, ...)
    full = _AllGather.apply(x, group)  # (W*top, ...)
    assert isinstance(full, Tensor), "_AllGather returns one tensor"
    if all(s == top for s in sizes):
        return full
    keep = torch.cat([torch.arange(r * top, r * top + s) for r, s in enumerate(sizes)])
    return full.index_select(0, keep.to(full.device))  # (W*top, ...) -> (sum(sizes), ...)


# ==== global negatives ====


def global_local_mi(
    local: Tensor, global_: Tensor, estimator: str, *, group: Any = None
) -> tuple[Tensor, Tensor]:
    """`local_mi` over the global batch of all ranks, computed as this rank's share.

    Each rank passes its own embeddings: local (n_r, u, H, W) and global (n_r, u). The local
    embeddings of all ranks are gathered with gradients into the global batch (N, u, H, W), in
    rank order, and this rank scores its own n_r rows against all N images
    (`dimcli.objectives.local_mi_rows`; scores (n_r, N, HW) instead of (N, N, HW)). The global
    loss L is a sum of per-row parts plus, for DV, one log-sum-exp over every negative:

        JSD: share_r = sum_{i in r} [pos_i / (N HW) + neg_i / (N (N-1) HW)]
        NCE: share_r = sum_{i in r, k} [-s_iik + log(e^{s_iik} + e^{neg_i})] / (N HW)
        DV:  share_r = -sum_{i in r} pos_i / (N HW) + (LSE_i neg_i - log(N (N-1) HW)) / W

    so that L = sum_r share_r; DV's LSE runs over every rank's row log-sum-exps, gathered with
    gradients. The returned loss is W * share_r. Why W: the gathers' backward sums every rank's
    gradient into each slice, so rank r's parameters receive W times their part of dL/dtheta,
    and DDP's average over the W ranks leaves exactly dL/dtheta. The mean over ranks of the
    returned loss is L (for equal batches, W * share_r is L restricted to rank r's rows).

    Returns:
        (loss, estimate): W * share_r and the matching MI estimate (detached); both average
        over ranks to the single-process values on the whole batch.

    Raises:
        ValueError: bad shapes, an unknown estimator, or a global batch of fewer than 2.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if local.dim() != 4 or global_.dim() != 2 or global_.shape != local.shape[:2]:
        raise ValueError(
            f"local must be (n, u, H, W) and global_ (n, u), "
            f"got {tuple(local.shape)} and {tuple(global_.shape)}"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n, _, h, w = local.shape
    hw = h * w

    # ---- the global batch of local embeddings, (N, u, H, W), with gradients ----
    sizes = gather_sizes(n, local.device, group)
    local_all = gather_rows(local, sizes, group)
    total = sum(sizes)
    start = sum(sizes[:rank])

    # ---- this rank's rows against every image ----
    pos, neg = local_mi_rows(local_all, global_, start, estimator)

    # ---- this rank's share of the global loss ----
    n_neg = total * (total - 1) * hw
    if estimator == "jsd":
        share = pos.sum() / (total * hw) + neg.sum() / n_neg
    elif estimator == "nce":
        share = (-pos + torch.logaddexp(pos, neg[:, None])).sum() / (total * hw)  # (n, HW)
    else:
        neg_all = gather_rows(neg, sizes, group)  # (N,) every row's log-sum-exp of negatives
        share = (
            -pos.sum() / (total * hw) + (torch.logsumexp(neg_all, dim=0) - math.log(n_neg)) / world
        )
    loss = world * share

    if estimator == "jsd":
        estimate = 2.0 * math.log(2.0) - loss
    elif estimator == "nce":
        estimate = math.log(1.0 + (total - 1) * hw) - loss
    else:
        estimate = -loss
    return loss, estimate.detach()


class GlobalNegatives:
    """A `DIMModel.scorer` that scores this rank's rows against the whole global batch."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def __call__(self, local: Tensor, global_: Tensor, estimator: str) -> tuple[Tensor, Tensor]:
        return global_local_mi(local, global_, estimator, group=self.group)


# ==== the two players under DDP ====


def wrap_models(
    dim_model: DIMModel,
    disc: nn.Module | None,
    ctx: DistContext,
    *,
    negatives: str = "global",
    sync_bn: bool = False,
) -> tuple[nn.Module, nn.Module | None]:
    """DistributedDataParallel wrappers for the DIM model and the prior discriminator.

    The two players step separately, each with its own optimiser, so each has its own DDP
    (its own gradient buckets and reducer). Their parameters never meet: the encoder's prior
    term evaluates the discriminator through `torch.func.functional_call` with detached
    parameters, on the bare module, and the discriminator's loss sees y detached. Every
    parameter of each wrapper gets a gradient in every backward, so neither needs
    `find_unused_parameters`. Optimisers built on the bare modules stay valid: DDP and
    SyncBatchNorm conversion keep the same Parameter objects.

    Args:
        dim_model: a `DIMModel` already on `ctx.device` (its `scorer` is set for "global").
        disc: the bare prior discriminator, or None when gamma is 0.
        negatives: "global" (score against every rank's images) or "local" (own batch only).
        sync_bn: BatchNorm statistics over the global batch (CUDA only).

    Raises:
        UsageError: --sync-bn on a CPU, or an unknown --negatives.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    assert ctx.enabled and ctx.device is not None, "wrap_models needs a multi-process context"
    if negatives not in NEGATIVES:
        raise UsageError(f"--negatives must be global or local, got {negatives!r}")
    if sync_bn:
        if ctx.device.type != "cuda":
            raise UsageError(
                "--sync-bn needs CUDA GPUs: torch's SyncBatchNorm has no CPU implementation; "
                "drop --sync-bn on the CPU"
            )
        # In place for a model whose root is not a BatchNorm; keeps parameters and buffers.
        nn.SyncBatchNorm.convert_sync_batchnorm(dim_model)
    if negatives == "global":
        dim_model.scorer = GlobalNegatives()
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # DDP copies rank 0's buffers (BatchNorm running statistics) to every rank at each forward.
    dim_ddp = DDP(dim_model, device_ids=ids)
    disc_ddp = DDP(disc, device_ids=ids) if disc is not None else None
    return dim_ddp, disc_ddp


def split_batch(batch_size: int, world_size: int) -> int:
    """Images per process of a global batch.

    Raises:
        UsageError: a batch that does not split evenly, or leaves a process fewer than 2.
    """
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise UsageError(
            f"batch size {batch_size} does not split evenly over {world_size} processes; "
            f"use a multiple of {world_size}, e.g. --batch-size {max(lower, 2 * world_size)}"
        )
    per_rank = batch_size // world_size
    if per_rank < 2:
        raise UsageError(
            f"batch size {batch_size} over {world_size} processes leaves {per_rank} image per "
            f"process; BatchNorm and negatives need at least 2: use --batch-size "
            f"{2 * world_size} or more"
        )
    return per_rank


# ==== encoding: batches dealt out in turn ====


class RoundRobinBatches(Sampler[int]):
    """Indices of batches rank, rank + W, rank + 2W, ... of a dataset cut into batches in order.

    Batched by `batch_size` again (drop_last=False), they give this rank's batches exactly:
    every batch but the dataset's last is full.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int) -> None:
        self.size = size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def batches(self) -> range:
        return range(self.rank, math.ceil(self.size / self.batch_size), self.world_size)

    def __iter__(self) -> Iterator[int]:
        b = self.batch_size
        for j in self.batches():
            yield from range(j * b, min((j + 1) * b, self.size))

    def __len__(self) -> int:
        b = self.batch_size
        return sum(min((j + 1) * b, self.size) - j * b for j in self.batches())


def encode_rounds(
    batches: Iterable[Any],
    *,
    rounds: int,
    embed: Callable[[Tensor], Tensor],
    keys: Sequence[str],
    sink: Any,
    skip_log: Any,
    on_batch: Callable[[int], None] | None,
    ctx: DistContext,
) -> int:
    """`dimcli.encode.encode_batches` for one rank of many: rank 0 writes every rank's rows.

    In each round every rank encodes its next batch (`RoundRobinBatches`; none in the last
    round for some), then two collectives: the batch's skipped files and row count go to every
    rank, so that all of them record the same bad files and raise together under "fail"; the
    rows and paths go to rank 0, which hands them to `sink` in rank order, the order of the
    folder. At most W batches of rows are held at once.

    Args:
        batches: this rank's `dimcli.data.Batch`es.
        rounds: ceil(batches of the folder / W); the same on every rank.
        sink: a `RowSink` on rank 0 (None elsewhere).
        skip_log: a `dimcli.data.SkipLog`; every rank records every rank's bad files.
        on_batch: called on every rank with the images (encoded + skipped) of each round.

    Returns:
        Rows written by all ranks.
    """
    it = iter(batches)
    n_rows = 0
    for _ in range(rounds):
        batch = next(it, None)
        rows: np.ndarray | None = None
        paths: list[str] = []
        skipped: list[tuple[str, str]] = []
        if batch is not None:
            skipped = [(keys[i], reason) for i, reason in batch.skipped]
            if len(batch):
                rows = embed(batch.images).numpy()  # (B, 3, S, S) -> (B, D)
                paths = [keys[i] for i in batch.indices.tolist()]

        # ---- what every rank must know: bad files and counts ----
        seen = ctx.all_gather((len(paths), skipped))
        images = 0
        for count, bad in seen:
            for key, reason in bad:
                skip_log.record(key, reason)
            images += count + len(bad)
            n_rows += count

        # ---- the rows, to rank 0, written in rank order ----
        gathered = ctx.gather_to_main((rows, paths))
        if gathered is not None and sink is not None:
            for part_rows, part_paths in gathered:
                if part_rows is not None:
                    sink.write(part_rows, part_paths)
        if on_batch is not None:
            on_batch(images)
    return n_rows


# ==== launching ====


def option_args(options: Mapping[str, str | int | float | bool | Path | None]) -> list[str]:
    """Command-line options for `options` by parameter name: --name=value, --name, --no-name.

    None leaves an option out; True gives the flag, False its --no- form.
    """
    out: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out.append(f"{flag}={value}")
    return out


def launch(args: Sequence[str], nproc_per_node: int) -> int:
    """Run `python -m dimcli ARGS` as `nproc_per_node` processes of one job on this node.

    The launcher is torchrun's own (`torch.distributed.launcher.api.elastic_launch`, as
    `torchrun --standalone` runs it): a rendezvous on a free local port, no restarts. Each
    process prints its own errors (rank 0 only); this returns the first failed process's exit
    code, or 0.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    # Share the CPU cores out instead of letting every process start one thread per core.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"dimcli-{uuid.uuid4()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
    )
    # The processes print their own errors; the agent's log lines about them would repeat them.
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    # The agent installs its own handlers for these and leaves them behind; put ours back.
    watched = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
    handlers = {sig: signal.getsignal(sig) for sig in watched}
    try:
        elastic_launch(config, sys.executable)("-m", "dimcli", *args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = int(failure.exitcode)
        if code > 0:
            return code
        # A process killed by a signal printed nothing: say which one went.
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        print(f"error: process {rank} was killed by signal {name}", file=sys.stderr)
        return 128 - code
    except SignalException as err:
        return 128 + int(err.sigval)
    finally:
        agent_log.setLevel(level)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:  # None: set outside Python, nothing to restore
                    signal.signal(sig, handler)
    return 0
