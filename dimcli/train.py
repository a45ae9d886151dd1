"""Training: `train(settings)` learns a DIM encoder from an image folder into a run folder.

A run folder holds:

    config.json          resolved settings, versions, git commit (rewritten on resume)
    metrics.jsonl        one JSON line per logging interval ("kind": "step") and per epoch
    encoder.safetensors  the encoder and the metadata that rebuilds it (`dimcli.modelfile`)
    checkpoint/          resume state (`dimcli.checkpoint`); checkpoint.prev/ one save older
    skipped.txt          images that could not be decoded, when there were any

Beside the run folder, `latest` (a relative symlink, or a text file `LATEST` holding the
name where symlinks are not supported) names the newest run; `--resume latest` follows it.

Under torchrun (or `dim train --nproc-per-node K`) every process runs `train`: rank 0 picks the
run folder and alone writes files and prints, `EpochSampler` gives each process its slice of
every global batch, the two players are wrapped in DistributedDataParallel
(`dimcli.distributed.wrap_models`), and every decision that must be the same on all processes
(stop, skip a batch, skip a non-finite step) is agreed on with one small collective.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import Sampler

from dimcli import __version__, data, distributed
from dimcli.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from dimcli.errors import DimError, NonFiniteLossError, UsageError
from dimcli.models import DIMModel, PriorDiscriminator, build_encoder, discriminator_loss
from dimcli.settings import TrainSettings, validate_settings

RUNS_DIR = Path("runs")
LATEST_LINK = "latest"
LATEST_FILE = "LATEST"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "encoder.safetensors"
RESIZE_POLICY = "shorter side to image_size (bilinear, antialiased), centre crop"

# precision="auto" on a CPU with bf16 instructions (AVX512-BF16, AMX): bf16 autocast.
# bench/precision_quality.py measured it 1.6x faster than fp32 (both channels_last) for the
# same steps, with linear-probe accuracies within the spread between seeds (docs/
# benchmarks.md). CPUs without those instructions emulate bf16 slowly and keep fp32. On CUDA,
# bf16 is used wherever the GPU supports it.
CPU_AUTO_BF16 = True

# Settings that fix the model, the objective or the data order; a resumed run keeps them.
_FROZEN = (
    "encoder",
    "image_size",
    "feature_dim",
    "mi_units",
    "estimator",
    "weights",
    "batch_size",
    "seed",
    "augment",
)


# ==== results ====


@dataclass
class TrainResult:
    """What a call of `train` did.

    Attributes:
        run_dir: the run folder.
        model_path: the encoder file (None if the run stopped before writing one).
        steps: optimisation steps done in all (including earlier sessions of a resumed run).
        epochs: complete epochs.
        seconds: wall time of this session.
        images_per_s: training images per second in this session.
        final: the last logging interval's "loss_*" and "mi_*" means.
        skipped_images: images that could not be decoded.
        skipped_steps: steps skipped for a non-finite loss (`--on-nonfinite skip`).
        interrupted: the signal number (SIGINT, SIGTERM) that stopped the run, else None.
        resumed_from: the step this session continued from, or None for a new run.
    """

    run_dir: Path
    model_path: Path | None
    steps: int
    epochs: int
    seconds: float
    images_per_s: float
    final: dict[str, float] = field(default_factory=dict)
    skipped_images: int = 0
    skipped_steps: int = 0
    interrupted: int | None = None
    resumed_from: int | None = None


# ==== device and precision ====


def resolve_device(spec: str) -> torch.device:
    """ "auto" (cuda, then mps, then cpu) or an explicit device that must exist.

    Raises:
        UsageError: CUDA or MPS asked for where torch cannot see it.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {spec} asked for, but torch sees no CUDA device "
                f"(torch {torch.__version__}); use --device cpu or --device auto"
            )
        device = torch.device(spec)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"device {spec} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}; pick one of them"
            )
        return device
    if spec == "mps" and not torch.backends.mps.is_available():
        raise UsageError(
            "device mps asked for, but torch sees no Apple Metal (MPS) device; "
            "use --device cpu or --device auto"
        )
    return torch.device(spec)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX).

    On Linux the CPU's flags say; elsewhere oneDNN's own check, which also accepts CPUs that
    only convert bf16 to fp32 (AVX512 without BF16) and so may answer yes more often.
    """
    try:
        flags = _cpu_flags()
    except OSError:
        flags = None
    if flags is not None:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The x86 feature flags of the first CPU in /proc/cpuinfo, or None where there are none."""
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "fp32", "bf16" or "fp16" for `device`; "auto" picks bf16 where it is known to help.

    Raises:
        UsageError: bf16 on a CUDA GPU without bf16 support.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu" and CPU_AUTO_BF16 and cpu_supports_bf16():
            return "bf16"
        return "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            f"{torch.cuda.get_device_name(device)} has no bfloat16 support; "
            "use --precision fp16 or fp32"
        )
    return precision


def resolve_channels_last(setting: bool | None, device: torch.device) -> bool:
    """channels_last memory format: explicit, or on for CUDA and CPU (faster convolutions)."""
    if setting is not None:
        return setting
    return device.type in ("cuda", "cpu")


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ==== data order ====


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch), that can start mid-epoch.

    The permutation is cut into global batches of `batch_size` (an incomplete last one is
    dropped); process `rank` of `world_size` takes the contiguous slice `rank` of each, so the
    slices of all processes, in rank order, are the global batch. `set_epoch(epoch,
    start_batch)` skips the first `start_batch` global batches without touching their images,
    which is how a resumed run picks up where it was, whatever its number of processes.
    """

    def __init__(
        self, size: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of {world_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.per_rank = batch_size // world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def order(self, epoch: int) -> Tensor:
        """The full permutation of dataset indices for `epoch`."""
        # SeedSequence mixes (seed, epoch) into well-separated streams for every epoch.
        mixed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(mixed))
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        full = self.size // self.batch_size
        lo = self.rank * self.per_rank
        order = self.order(self.epoch)[: full * self.batch_size].view(full, self.batch_size)
        # (batches, batch_size) -> this process's columns of the batches still to come
        return iter(order[self.start_batch :, lo : lo + self.per_rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return max(0, self.size // self.batch_size - self.start_batch) * self.per_rank


def build_sampler(
    size: int, settings: TrainSettings, rank: int = 0, world: int = 1
) -> EpochSampler:
    """The data order of a run (the one place it is made), as process `rank` of `world` sees it."""
    return EpochSampler(
        size, batch_size=settings.batch_size, seed=settings.seed, rank=rank, world_size=world
    )


# ==== one step ====


@dataclass
class Models:
    """The trained modules: encoder + critics, and the prior discriminator when gamma > 0.

    In a multi-process run `dim_ddp` and `disc_ddp` are their DistributedDataParallel wrappers,
    which the step calls instead; the bare modules stay the ones saved and loaded.
    """

    dim: DIMModel
    disc: PriorDiscriminator | None
    dim_ddp: nn.Module | None = None
    disc_ddp: nn.Module | None = None


@dataclass
class Optimizers:
    """Separate Adam optimisers for the two players of the min-max."""

    model: torch.optim.Optimizer
    disc: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None  # fp16 on CUDA only


@dataclass(frozen=True)
class StepConfig:
    """How a step runs: device, autocast dtype, memory format, penalty, non-finite policy."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    gp_weight: float
    mean: tuple[float, ...] = data.PAPER_MEAN
    std: tuple[float, ...] = data.PAPER_STD
    # ORs flags over every process (`DistContext.any`), so that all of them skip a step together.
    any_process: Callable[..., list[bool]] | None = None


@dataclass
class StepOutput:
    """Scalars of one step ("loss_*", "mi_*"); `bad` names the non-finite ones (no update then)."""

    values: dict[str, float]
    bad: list[str]


def train_step(models: Models, opts: Optimizers, images: Tensor, cfg: StepConfig) -> StepOutput:
    """One min-max step on a uint8 batch (N, 3, S, S) already on the device.

    The encoder and critics take an Adam step on alpha*G + beta*L + gamma*prior; then the
    discriminator takes its own step on its loss. Nothing is updated when any term is not
    finite (BatchNorm statistics are put back too): the names of those terms come back in `bad`.
    """
    # ---- inputs: uint8 -> normalised float32, in the chosen memory format ----
    x = data.normalize(images, cfg.mean, cfg.std)  # (N, 3, S, S) float32
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    # BatchNorm statistics move in the forward pass; keep a copy to undo a non-finite step.
    buffers = [b.detach().clone() for b in models.dim.buffers()]

    # ---- forward: encoder, critics and the weighted objective (float32 inside) ----
    autocast = (
        torch.autocast(cfg.device.type, dtype=cfg.amp_dtype)
        if cfg.amp_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        dim_model = models.dim_ddp if models.dim_ddp is not None else models.dim
        out = dim_model(x, discriminator=models.disc)
    scalars: dict[str, Tensor] = {"loss_total": out.total}
    scalars.update({f"loss_{name}": term for name, term in out.terms.items()})

    # ---- the discriminator's loss on this batch's codes (y is detached inside) ----
    disc_loss: Tensor | None = None
    if models.disc is not None:
        assert out.y is not None, "DIMModel.forward must return y"
        disc = models.disc_ddp if models.disc_ddp is not None else models.disc
        disc_loss = discriminator_loss(disc, out.y, cfg.gp_weight)
        scalars["loss_disc"] = disc_loss
    scalars.update(out.estimates)

    # ---- one device sync: every scalar to the host, checked before any update ----
    host = torch.stack([v.detach().float().reshape(()) for v in scalars.values()]).cpu()
    values = dict(zip(scalars, host.tolist(), strict=True))
    flags = [not math.isfinite(v) for v in values.values()]
    if cfg.any_process is not None:
        flags = cfg.any_process(*flags)  # a term bad on any process stops every process's step
    bad = [name for name, flag in zip(values, flags, strict=True) if flag]
    if bad:
        with torch.no_grad():
            for buffer, saved in zip(models.dim.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        return StepOutput(values, bad)

    # ---- encoder + critics step ----
    opts.model.zero_grad(set_to_none=True)
    if opts.scaler is not None:
        opts.scaler.scale(out.total).backward()
        opts.scaler.step(opts.model)
        opts.scaler.update()
    else:
        out.total.backward()
        opts.model.step()

    # ---- discriminator step: the other player, its own optimiser ----
    if disc_loss is not None and opts.disc is not None:
        opts.disc.zero_grad(set_to_none=True)
        disc_loss.backward()
        opts.disc.step()

    return StepOutput(values, [])


# ==== run folder ====


def default_run_dir(now: datetime | None = None) -> Path:
    """runs/<YYYYmmdd-HHMMSS>, with -2, -3, ... when that name is taken."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    candidate = RUNS_DIR / stamp
    n = 2
    while candidate.exists():
        candidate = RUNS_DIR / f"{stamp}-{n}"
        n += 1
    return candidate


def update_latest(run_dir: Path) -> None:
    """Point `<parent>/latest` at `run_dir` (relative symlink, replaced atomically).

    Where symlinks are not supported, `<parent>/LATEST` holds the run's name instead.
    """
    parent, name = run_dir.parent, run_dir.name
    link = parent / LATEST_LINK
    if name == LATEST_LINK or (link.exists() and not link.is_symlink()):
        return  # a real folder called "latest" is a run of its own; leave it alone
    tmp = parent / f".{LATEST_LINK}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp, target_is_directory=True)
        os.replace(tmp, link)
        return
    except (OSError, NotImplementedError):
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    # Limitation: without symlink support `latest` is a text file, so `dim encode runs/latest`
    # does not work there; `--resume latest` reads LATEST instead. See docs/limitations.md
    _write_text_atomic(parent / LATEST_FILE, name + "\n")


def resolve_run_dir(resume: str) -> Path:
    """The run folder `--resume` names: "latest" (runs/latest or runs/LATEST) or a path.

    Raises:
        UsageError: nothing to resume there.
    """
    if resume == "latest":
        link = RUNS_DIR / LATEST_LINK
        if link.is_symlink() or link.is_dir():
            return RUNS_DIR / os.readlink(link) if link.is_symlink() else link
        marker = RUNS_DIR / LATEST_FILE
        if marker.is_file():
            return RUNS_DIR / marker.read_text(encoding="utf-8").strip()
        raise UsageError(
            f"no run to resume: {link} does not exist; pass the run folder, "
            "e.g. --resume runs/20240101-120000"
        )
    path = Path(resume)
    if path.name == LATEST_LINK and not path.exists() and (path.parent / LATEST_FILE).is_file():
        return path.parent / (path.parent / LATEST_FILE).read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise UsageError(
            f"cannot resume {path}: no such run folder; pass a folder `dim train` made"
        )
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _git_sha() -> str | None:
    """The commit of the dimcli source when it runs from a git checkout, else None.

    git is asked in the folder of the dimcli package, not the current one, so a run started in
    the user's own repository does not record that repository's commit; and the package's files
    must be tracked there, so an installed copy (site-packages, even in a .venv inside some
    repository) records None. Any failure of git (missing, slow, not a checkout) is None too.
    """
    package_dir = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # no GIT_DIR etc.

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(package_dir), *args],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    if not git("ls-files", "--error-unmatch", "--", Path(__file__).name):
        return None  # not a checkout, or dimcli is not part of it
    sha = git("rev-parse", "--verify", "HEAD")
    return sha or None


def versions() -> dict[str, str | None]:
    """Versions that affect results (the paper's numbers are framework-sensitive)."""
    return {
        "dimcli": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The parsed config.json of a run folder.

    Raises:
        UsageError: missing or unreadable (not a run folder of `dim train`).
    """
    path = run_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{run_dir} is not a run folder of `dim train` (no {CONFIG_FILE}); "
            "pass the folder a run wrote, or start a new run"
        ) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}; the run folder is damaged") from None
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise UsageError(f"{path} has no settings; the run folder is damaged")
    return config


def _identity(s: TrainSettings) -> dict[str, Any]:
    """What must not change when a run is resumed, with automatic values filled in."""
    return {
        "encoder": s.encoder,
        "image_size": s.resolved_image_size(),
        "feature_dim": s.feature_dim,
        "mi_units": s.mi_units,
        "estimator": s.estimator,
        "weights": s.weights(),
        "batch_size": s.batch_size,
        "seed": s.seed,
        "augment": s.resolved_augment(),
    }


def merge_resume(stored: TrainSettings, given: TrainSettings) -> TrainSettings:
    """The settings of a resumed run: the stored ones plus what `given` set explicitly.

    Raises:
        UsageError: an explicit setting would change the model, objective or data order.
    """
    overrides = {
        name: getattr(given, name)
        for name in given.model_fields_set
        if name not in ("resume", "out")
    }
    if "images" in overrides and overrides["images"] is not None:
        overrides["images"] = Path(overrides["images"]).absolute()
    merged = validate_settings({**stored.model_dump(), **overrides})
    before, after = _identity(stored), _identity(merged)
    changed = [k for k in _FROZEN if before[k] != after[k]]
    if changed:
        detail = ", ".join(f"{k} (run: {before[k]}, now: {after[k]})" for k in changed)
        raise UsageError(
            f"cannot change {detail} when resuming; drop those options, "
            "or start a new run with another --out"
        )
    return merged


# ==== progress output ====


class _Display:
    """A rich progress bar on a terminal, plain lines otherwise, nothing when quiet."""

    def __init__(self, console: Console, verbosity: int) -> None:
        self.console = console
        self.verbosity = verbosity
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, total: int | None, done: int) -> None:
        """Show the bar (terminal only), `done` of `total` steps complete."""
        if self.verbosity >= 0 and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total, completed=done, status="")
            self.progress.start()

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, status=text)

    def line(self, text: str, *, level: int = 0) -> None:
        """Print a line at `level` (0 normal, 1 verbose); above the bar when there is one."""
        if self.verbosity >= level:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        if self.progress is not None:
            self.console.print(f"warning: {data.printable(text)}", markup=False, highlight=False)
        else:
            data.warn_stderr(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# What the progress bar shows beside it (the log lines carry every term).
_STATUS_KEYS = ("loss_total", "mi_local", "mi_global")


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _progress_line(record: dict[str, Any]) -> str:
    """The one greppable line per logging interval."""
    parts = [f"step {record['step']}", f"epoch {record['epoch']}"]
    parts += [f"{k} {_fmt(v)}" for k, v in record.items() if k.startswith(("loss_", "mi_"))]
    parts += [f"img/s {record['images_per_s']:.0f}", f"data {100 * record['data_wait']:.0f}%"]
    return " | ".join(parts)


class _Meter:
    """Sums of step scalars, images and times over an interval (or an epoch)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    def add(self, values: dict[str, float], images: int, wait: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += images
        self.wait += wait

    def record(
        self, kind: str, ctx: distributed.DistContext | None = None, **extra: Any
    ) -> dict[str, Any]:
        """The interval's line; with `ctx`, over every process (a collective: all must call)."""
        sums, images, wait = self.sums, self.images, self.wait
        if ctx is not None:
            sums, images, wait = ctx.reduce_meter(sums, images, wait)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rec: dict[str, Any] = {"kind": kind, **extra}
        rec["images_per_s"] = images / elapsed
        rec["data_wait"] = min(1.0, wait / elapsed)
        rec.update({k: v / max(self.steps, 1) for k, v in sums.items()})
        return rec


# ==== signals ====


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops after the current step.

    A second SIGINT raises KeyboardInterrupt at once, for when saving hangs.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


# ==== the run ====


@dataclass
class _Run:
    """Everything one session of training needs, resolved from the settings."""

    settings: TrainSettings
    run_dir: Path
    device: torch.device
    precision: str
    channels_last: bool
    workers: int
    resumed: bool = False
    ctx: distributed.DistContext = field(default_factory=distributed.DistContext)

    @property
    def is_main(self) -> bool:
        """The process that prints and writes files (the only one, without torchrun)."""
        return self.ctx.is_main


def _prepare(settings: TrainSettings) -> tuple[TrainSettings, Path, bool]:
    """Resolve --resume and --out into (settings, run folder, resuming?) before any work."""
    if settings.resume is not None:
        run_dir = resolve_run_dir(settings.resume)
        if settings.out is not None and Path(settings.out).absolute() != run_dir.absolute():
            raise UsageError(
                f"--out {settings.out} and --resume {settings.resume} name different folders; "
                "drop --out to continue the run in its own folder"
            )
        config = read_run_config(run_dir)
        try:
            stored = TrainSettings(**config["settings"])
        except Exception as err:  # a damaged or foreign config.json
            raise UsageError(f"{run_dir / CONFIG_FILE} holds invalid settings ({err})") from None
        return merge_resume(stored, settings), run_dir, True

    run_dir = Path(settings.out) if settings.out is not None else default_run_dir()
    if run_dir.exists():
        if not run_dir.is_dir():
            raise UsageError(f"--out {run_dir} is a file; pass a folder name for the run")
        if any(run_dir.iterdir()):
            raise UsageError(
                f"run folder {run_dir} already exists and is not empty; continue it with "
                f"--resume {run_dir}, or pick another --out"
            )
    if settings.images is None:
        raise UsageError("no image folder given; pass one: dim train IMAGES")
    stored = validate_settings(
        {
            **settings.model_dump(),
            "images": Path(settings.images).absolute(),
            "out": run_dir,
            "resume": None,
        }
    )
    return stored, run_dir, False


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def _determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the duration of a run, restored afterwards."""
    was = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.backends.cudnn.benchmark = benchmark


def _build(run: _Run) -> tuple[Models, Optimizers]:
    s = run.settings
    alpha, beta, gamma = s.weights()
    encoder = build_encoder(
        s.encoder, image_size=s.resolved_image_size(), feature_dim=s.feature_dim
    )
    dim = DIMModel(
        encoder,
        estimator=s.estimator,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        mi_units=s.mi_units,
        kernel=s.local_mi_kernel,
    ).to(run.device)
    disc = PriorDiscriminator(s.feature_dim).to(run.device) if gamma > 0 else None
    if run.channels_last:
        dim = dim.to(memory_format=torch.channels_last)
    if s.compile:
        dim.encoder.compile()  # in place: state_dict keys stay the same

    betas = (s.beta1, s.beta2)
    opt = torch.optim.Adam(dim.parameters(), lr=s.lr, betas=betas)
    disc_opt = (
        torch.optim.Adam(disc.parameters(), lr=s.disc_lr or s.lr, betas=betas)
        if disc is not None
        else None
    )
    scaler = (
        torch.amp.GradScaler("cuda")
        if run.precision == "fp16" and run.device.type == "cuda"
        else None
    )
    return Models(dim, disc), Optimizers(opt, disc_opt, scaler)


def _resolved(run: _Run, num_images: int) -> dict[str, Any]:
    s = run.settings
    alpha, beta, gamma = s.weights()
    return {
        "image_size": s.resolved_image_size(),
        "augment": s.resolved_augment(),
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "epochs": s.resolved_epochs(),
        "disc_lr": s.disc_lr or s.lr,
        "device": str(run.device),
        "precision": run.precision,
        "channels_last": run.channels_last,
        "workers": run.workers,
        "world_size": run.ctx.world_size,
        "num_images": num_images,
    }


def _preprocessing(s: TrainSettings) -> dict[str, Any]:
    return {
        "image_size": s.resolved_image_size(),
        "mean": list(data.PAPER_MEAN),
        "std": list(data.PAPER_STD),
        "resize": RESIZE_POLICY,
    }


def _truncate_metrics(path: Path, step: int, epochs: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from (step, complete epochs)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            later = int(rec["step"]) > step or (
                rec["kind"] == "epoch" and int(rec["epoch"]) > epochs
            )
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        if not later:
            kept.append(line)
    _write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def train(
    settings: TrainSettings,
    *,
    console: Console | None = None,
    verbosity: int = 0,
) -> TrainResult:
    """Train (or resume) a DIM encoder as `settings` say; returns where everything went.

    Args:
        settings: validated settings (`dimcli.settings.load_settings`).
        console: where progress goes (default: a rich Console on stdout).
        verbosity: -1 quiet (final line only), 0 normal, 1 verbose (settings, each save).

    Raises:
        UsageError: bad settings for this machine or run folder.
        DimError: unreadable images, a full disk, ...
        NonFiniteLossError: a NaN/inf loss under `on_nonfinite="fail"`.
    """
    console = console or Console()
    # Under torchrun every process gets here; rank 0 alone decides the run folder.
    ctx = distributed.setup(settings.device)
    settings, run_dir, resuming = ctx.on_main(lambda: _prepare(settings))
    device = ctx.device if ctx.device is not None else resolve_device(settings.device)
    run = _Run(
        settings=settings,
        run_dir=run_dir,
        device=device,
        precision=resolve_precision(settings.precision, device),
        channels_last=resolve_channels_last(settings.channels_last, device),
        workers=data.auto_workers() if settings.workers is None else settings.workers,
        resumed=resuming,
        ctx=ctx,
    )
    with _determinism(settings.deterministic), _StopRequest() as stop:
        session = _Session(run, console, verbosity, stop)
        if run.resumed:
            session.restore()
        session.open_run_folder()
        if session.finished() and run.resumed:
            session.display.line(
                f"nothing to do: the run is at step {session.step}, epoch {session.epoch}; "
                "pass a larger --epochs or --max-steps to train further"
            )
        result = session.run_loop()
    if run.is_main:
        if settings.report and result.interrupted is None:
            _write_report(run.run_dir, session.display)
        _summary(console, verbosity, result)
    return result


class _Session:
    """One session of a run: data, models, counters, and the files it writes."""

    def __init__(self, run: _Run, console: Console, verbosity: int, stop: _StopRequest) -> None:
        self.run = run
        self.s = s = run.settings
        self.stop = stop
        self.console = console
        self.verbosity = verbosity if run.is_main else -2
        self.display = _Display(console, self.verbosity)
        # Rank 0 hears of every process's bad files (see `next_batch`) and alone warns.
        warn = self.display.warn if run.is_main else _ignore
        self.started = time.perf_counter()
        ctx = run.ctx

        # ==== data ====
        assert s.images is not None, "validated settings always name the image folder"
        self.image_size = s.resolved_image_size()
        augment = s.resolved_augment()
        transform = data.make_transform(self.image_size, augment, train=True)
        self.dataset = data.ImageFolder(s.images, transform=transform, warn=warn)
        data.ensure_readable(self.dataset)
        n = len(self.dataset)
        if n < s.batch_size:
            raise UsageError(
                f"{n} images in {s.images} but the batch size is {s.batch_size}; "
                f"lower --batch-size to at most {n} or add images"
            )
        per_process = distributed.split_batch(s.batch_size, ctx.world_size)
        self.sampler = build_sampler(n, s, ctx.rank, ctx.world_size)
        # Limitation: with workers > 0, random augmentations draw from per-worker generators
        # that restart on resume, so a resumed run matches an uninterrupted one exactly only
        # with workers=0 or augment "none"; see docs/limitations.md
        self.loader = data.make_loader(
            self.dataset,
            per_process,
            shuffle=False,
            drop_last=True,
            workers=run.workers,
            device=run.device,
            seed=ctx.rank_seed(s.seed),
            sampler=self.sampler,
        )
        self.steps_per_epoch = n // s.batch_size
        self.epochs_limit = s.resolved_epochs()
        self.skiplog = data.SkipLog(s.on_bad_image, warn=warn)

        # ==== models, seeded so that a run is reproducible (and alike on every process) ====
        _seed_everything(s.seed)
        self.models, self.opts = _build(run)
        if ctx.enabled:
            self.models.dim_ddp, self.models.disc_ddp = distributed.wrap_models(
                self.models.dim,
                self.models.disc,
                ctx,
                negatives=s.negatives,
                sync_bn=s.sync_bn,
            )
        ctx.seed_process(s.seed, 0)

        # ==== counters (a checkpoint overwrites them) ====
        self.step = 0  # optimisation steps done
        self.epoch = 0  # complete epochs
        self.batch_in_epoch = 0  # batches of the current epoch's order consumed
        self.elapsed_before = 0.0  # seconds spent in earlier sessions
        self.skipped_steps = 0
        self.session_images = 0
        self.last_saved = -1
        self.resumed_from: int | None = None
        self.final: dict[str, float] = {}
        self.config_doc: dict[str, Any] = {}
        self.metrics_file: Any = None

    # ---- resume ----

    def restore(self) -> None:
        """Load the run's checkpoint, if there is one, into models, optimisers and counters."""
        # Rank 0 reads it and hands it to the others: the run folder need only be where it runs.
        run_dir = self.run.run_dir
        ckpt = self.run.ctx.on_main(lambda: load_checkpoint(run_dir))
        if ckpt is None:
            return  # the run folder was made but no step was saved: start from step 0
        s, st, models, opts = self.s, ckpt.state, self.models, self.opts
        prog = st["progress"]
        if int(prog["num_images"]) != len(self.dataset):
            raise UsageError(
                f"{s.images} now holds {len(self.dataset)} images but the run was trained on "
                f"{prog['num_images']}; resume needs the same images, or start a new run"
            )
        models.dim.load_state_dict(st["model"])
        opts.model.load_state_dict(st["optimizer"])
        for group in opts.model.param_groups:
            group["lr"] = s.lr  # the learning rates may change on resume
        if models.disc is not None and opts.disc is not None:
            models.disc.load_state_dict(st["disc"])
            opts.disc.load_state_dict(st["disc_optimizer"])
            for group in opts.disc.param_groups:
                group["lr"] = s.disc_lr or s.lr
        if opts.scaler is not None and st.get("scaler"):
            opts.scaler.load_state_dict(st["scaler"])
        self.step, self.epoch = int(prog["step"]), int(prog["epoch"])
        self.batch_in_epoch = int(prog["batch_in_epoch"])
        self.skipped_steps = int(prog["skipped_steps"])
        self.elapsed_before = float(prog["elapsed"])
        # Re-record earlier bad files silently, so skipped.txt keeps them.
        warn, self.skiplog.warn = self.skiplog.warn, _ignore
        for key, reason in st.get("skipped", []):
            self.skiplog.record(str(key), str(reason))
        self.skiplog.warn = warn
        self.resumed_from = self.last_saved = self.step
        # Last: building the loader and the models above drew from the generators.
        restore_rng(st["rng"])
        self.run.ctx.seed_process(s.seed, self.step)

    # ---- files ----

    def open_run_folder(self) -> None:
        """Write config.json, point `latest` here, open metrics.jsonl (main process only)."""
        run = self.run
        if not run.is_main:
            return
        run.run_dir.mkdir(parents=True, exist_ok=True)
        previous = read_run_config(run.run_dir) if run.resumed else {}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.config_doc = {
            "format": "dimcli.run",
            "format_version": 1,
            "settings": self.s.model_dump(mode="json"),
            "resolved": _resolved(run, len(self.dataset)),
            "versions": versions(),
            "git_sha": _git_sha(),
            "created": previous.get("created", now),
            "updated": now,
        }
        _write_text_atomic(run.run_dir / CONFIG_FILE, json.dumps(self.config_doc, indent=2) + "\n")
        update_latest(run.run_dir)
        metrics = run.run_dir / METRICS_FILE
        if run.resumed:
            _truncate_metrics(metrics, self.step, self.epoch)
        self.metrics_file = open(metrics, "a", encoding="utf-8")  # noqa: SIM115 - closed in run()

    def checkpoint_state(self) -> dict[str, Any]:
        models, opts = self.models, self.opts
        return {
            "model": models.dim.state_dict(),
            "disc": models.disc.state_dict() if models.disc is not None else None,
            "optimizer": opts.model.state_dict(),
            "disc_optimizer": opts.disc.state_dict() if opts.disc is not None else None,
            "scaler": opts.scaler.state_dict() if opts.scaler is not None else None,
            "progress": {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "elapsed": self.elapsed(),
                "skipped_steps": self.skipped_steps,
                "num_images": len(self.dataset),
            },
            "rng": capture_rng(),
            "skipped": [list(entry) for entry in self.skiplog.entries],
        }

    def save(self) -> None:
        """Checkpoint, model file and skipped.txt, all at the current step."""
        if self.run.is_main:
            save_checkpoint(self.run.run_dir, self.checkpoint_state())
            _save_model(self.run, self.models, self.step, self.epoch, self.config_doc, self.final)
            self.skiplog.write(self.run.run_dir)
            self.display.line(
                f"saved checkpoint at step {self.step} in {self.run.run_dir}", level=1
            )
        self.last_saved = self.step

    def emit(self, record: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def stamp(self) -> dict[str, Any]:
        """The identity part of a metrics line: the last step and the epoch it belonged to."""
        return {
            "step": self.step,
            "epoch": self.epoch + (1 if self.batch_in_epoch > 0 else 0),
            "time": self.elapsed(),
            "lr": self.opts.model.param_groups[0]["lr"],
            "skipped_steps": self.skipped_steps,
        }

    def finished(self) -> bool:
        s = self.s
        if s.max_steps is not None and self.step >= s.max_steps:
            return True
        return self.epochs_limit is not None and self.epoch >= self.epochs_limit

    def total_steps(self) -> int | None:
        total = None if self.epochs_limit is None else self.epochs_limit * self.steps_per_epoch
        if self.s.max_steps is not None:
            total = self.s.max_steps if total is None else min(total, self.s.max_steps)
        return total

    # ---- the loop ----

    def run_loop(self) -> TrainResult:
        s, run, display = self.s, self.run, self.display
        cfg = StepConfig(
            device=run.device,
            amp_dtype=_AMP_DTYPES.get(run.precision),
            channels_last=run.channels_last,
            gp_weight=s.gp_weight,
            any_process=run.ctx.any if run.ctx.enabled else None,
        )
        self.announce()
        display.start(self.total_steps(), self.step)
        self.models.dim.train()
        if self.models.disc is not None:
            self.models.disc.train()
        interval = _Meter()
        try:
            while not self.finished() and not self.stopping():
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                batches = iter(self.loader)
                # Limitation: after a resume mid-epoch, that epoch's metrics line averages only
                # the steps of this session; see docs/limitations.md
                epoch_meter = _Meter()
                while not self.finished() and not self.stopping():
                    # ---- data: next batch, to the device ----
                    t0 = time.perf_counter()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except RuntimeError:
                        if self.stop.signum is not None:
                            break  # workers went down with the same Ctrl-C; stop cleanly
                        raise
                    self.batch_in_epoch += 1
                    fewest, step_images = self.check_batch(batch)
                    if fewest < 2:
                        where = " on some process" if run.ctx.enabled else ""
                        display.warn(
                            f"batch {self.batch_in_epoch} of epoch {self.epoch + 1} has fewer "
                            f"than 2 readable images{where}; skipped"
                        )
                        continue
                    images = batch.images.to(run.device, non_blocking=True)
                    wait = time.perf_counter() - t0

                    # ---- the step ----
                    out = train_step(self.models, self.opts, images, cfg)
                    self.step += 1
                    self.session_images += step_images
                    if out.bad:
                        self.on_nonfinite(out)
                    else:
                        interval.add(out.values, len(batch), wait)
                        epoch_meter.add(out.values, len(batch), wait)
                    display.advance(self.step)

                    # ---- log ----
                    if self.step % s.log_every == 0 and interval.steps > 0:
                        self.log(interval)
                        interval = _Meter()

                    # ---- checkpoint ----
                    if self.step % s.save_every == 0:
                        self.save()

                # ---- end of epoch: every batch of its order consumed ----
                if self.batch_in_epoch >= self.steps_per_epoch:
                    if epoch_meter.steps > 0:
                        rec = epoch_meter.record("epoch", run.ctx, **self.stamp())
                        _reorder(rec)
                        self.emit(rec)
                        display.line(f"epoch {self.epoch + 1} done | {_progress_line(rec)}")
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.save()

            # ==== wrap up: the last partial interval, then the final state ====
            # A save at the last epoch's end predates this interval's metrics ("final" in
            # the model file), so save again after logging it.
            stale = interval.steps > 0
            if stale:
                self.log(interval)
            if stale or self.last_saved != self.step or not (run.run_dir / MODEL_FILE).exists():
                self.save()
        finally:
            display.close()
            if self.metrics_file is not None:
                self.metrics_file.close()
            if run.is_main:
                self.skiplog.write(run.run_dir)
        return self.result()

    def stopping(self) -> bool:
        """Whether SIGINT/SIGTERM reached any process (a collective: every process asks)."""
        return self.run.ctx.any(self.stop.signum is not None)[0]

    def check_batch(self, batch: data.Batch) -> tuple[int, int]:
        """Record the bad files every process met in this step's batch.

        Every process records all of them, so that under --on-bad-image fail all raise
        together. Returns (the fewest readable images of a process, readable images in all).
        """
        keys = self.dataset.keys
        mine = (len(batch), [(keys[i], reason) for i, reason in batch.skipped])
        seen = self.run.ctx.all_gather(mine)
        for _, bad in seen:
            for key, reason in bad:
                self.skiplog.record(key, reason)
        counts = [count for count, _ in seen]
        return min(counts), sum(counts)

    def on_nonfinite(self, out: StepOutput) -> None:
        detail = ", ".join(
            f"{k.removeprefix('loss_')} = {out.values[k]}"
            if not math.isfinite(out.values[k])
            else f"{k.removeprefix('loss_')} on another process"
            for k in out.bad
        )
        if self.s.on_nonfinite == "fail":
            kept = (
                f"the last good checkpoint (step {self.last_saved}) is kept in {self.run.run_dir}"
                if self.last_saved >= 0
                else "no checkpoint was saved before it"
            )
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step}: {detail}; {kept}; lower --lr, check the "
                "images, or pass --on-nonfinite skip"
            )
        self.skipped_steps += 1
        self.display.warn(f"non-finite loss at step {self.step}: {detail}; step skipped")

    def log(self, interval: _Meter) -> None:
        rec = interval.record("step", self.run.ctx, **self.stamp())
        _reorder(rec)
        self.emit(rec)
        self.final = {k: v for k, v in rec.items() if k.startswith(("loss_", "mi_"))}
        self.display.status(
            " ".join(f"{k} {_fmt(v)}" for k, v in self.final.items() if k in _STATUS_KEYS)
            + f" | {rec['images_per_s']:.0f} img/s"
        )
        self.display.line(_progress_line(rec))

    def announce(self) -> None:
        """The resolved configuration, once, at the start."""
        s, run = self.s, self.run
        alpha, beta, gamma = s.weights()
        params = sum(p.numel() for p in self.models.dim.parameters())
        flags = [str(run.device), run.precision]
        flags += ["channels_last"] if run.channels_last else []
        flags += ["compiled"] if s.compile else []
        self.display.line(
            f"{'resuming' if run.resumed else 'training'} {s.encoder} {s.preset} "
            f"(alpha {alpha:g}, beta {beta:g}, gamma {gamma:g}) {s.estimator} | "
            f"{len(self.dataset)} images, {self.image_size}px, augment {s.resolved_augment()} | "
            f"{', '.join(flags)} | {params / 1e6:.2f}M parameters | run {run.run_dir}"
        )
        if self.resumed_from is not None:
            self.display.line(
                f"continuing from step {self.step} (epoch {self.epoch + 1}, "
                f"batch {self.batch_in_epoch})"
            )
        self.display.line(json.dumps(self.config_doc.get("settings", {})), level=1)

    def result(self) -> TrainResult:
        seconds = time.perf_counter() - self.started
        return TrainResult(
            run_dir=self.run.run_dir,
            model_path=self.run.run_dir / MODEL_FILE,
            steps=self.step,
            epochs=self.epoch,
            seconds=seconds,
            images_per_s=self.session_images / max(seconds, 1e-9),
            final=self.final,
            skipped_images=len(self.skiplog.entries),
            skipped_steps=self.skipped_steps,
            interrupted=self.stop.signum,
            resumed_from=self.resumed_from,
        )


def _ignore(_message: str) -> None:
    pass


def _reorder(rec: dict[str, Any]) -> None:
    """Key order of a metrics line: identity, timing, then losses and estimates."""
    head = ["kind", "step", "epoch", "time", "images_per_s", "data_wait", "lr", "skipped_steps"]
    items = [(k, rec[k]) for k in head if k in rec]
    items += sorted((k, v) for k, v in rec.items() if k not in head)
    rec.clear()
    rec.update(items)


def _save_model(
    run: _Run,
    models: Models,
    step: int,
    epoch: int,
    config_doc: dict[str, Any],
    final: dict[str, float],
) -> None:
    from dimcli.modelfile import save_encoder

    training = {
        "settings": config_doc.get("settings", {}),
        "resolved": config_doc.get("resolved", {}),
        "versions": config_doc.get("versions", {}),
        "git_sha": config_doc.get("git_sha"),
        "steps": step,
        "epochs": epoch,
        "final": final,
    }
    path = run.run_dir / MODEL_FILE
    try:
        save_encoder(
            models.dim.encoder, path, preprocessing=_preprocessing(run.settings), training=training
        )
    except OSError as err:
        raise DimError(
            f"could not write the model file {path}: {err.strerror or err}; "
            f"free space and resume with: dim train --resume {run.run_dir}"
        ) from None


def _write_report(run_dir: Path, display: _Display) -> None:
    """The visual report, when this install has `dimcli.report` (an optional module)."""
    try:
        report = importlib.import_module("dimcli.report")
    except ModuleNotFoundError:
        display.warn("--report: this dimcli has no report module; skipped (run `dim report` later)")
        return
    write: Callable[..., Any] | None = getattr(report, "write_report", None)
    if write is None:
        display.warn("--report: dimcli.report has no write_report(); skipped")
        return
    try:
        write(run_dir)
    except DimError as err:  # the run itself is complete; say why the report is missing
        display.warn(f"--report: the report was not written: {err}")


def _summary(console: Console, verbosity: int, result: TrainResult) -> None:
    if verbosity < 0:
        console.print(f"saved {result.model_path}", highlight=False, markup=False)
        return
    table = Table(title="dim train", show_header=False, box=None)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("run folder", str(result.run_dir))
    table.add_row("model", str(result.model_path))
    table.add_row("metrics", str(result.run_dir / METRICS_FILE))
    table.add_row("steps", f"{result.steps} ({result.epochs} epochs)")
    table.add_row("time", f"{result.seconds:.1f} s, {result.images_per_s:.0f} images/s")
    for key, value in result.final.items():
        table.add_row(key, _fmt(value))
    if result.skipped_images:
        table.add_row("skipped images", f"{result.skipped_images} (see skipped.txt)")
    if result.skipped_steps:
        table.add_row("skipped steps", f"{result.skipped_steps} (non-finite loss)")
    console.print(table)
