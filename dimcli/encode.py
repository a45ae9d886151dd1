"""`dim encode`: a folder of images -> one feature row per image, streamed to a file.

The flow, in the order data moves:

1. `ImageFolder` lists the images (sorted by relative path) and decodes them in loader
   workers with the model's eval transform (shorter side to S, centre crop), exactly as
   training decodes them; a file that cannot be decoded travels along as a skipped sample.
2. `encode_batches` takes one batch at a time: records its skipped files, runs the encoder
   (`BatchEmbedder`: to the device, normalise, optional bf16 autocast and channels_last) and
   hands the rows to the writer before it asks for the next batch. Nothing accumulates, so
   memory does not grow with the folder.
3. `features.FeatureWriter` streams rows into temporary files next to the output and renames
   them into place only when every batch is done; an interrupted encode leaves nothing under
   the output's name.

Under torchrun (or `dim encode --nproc-per-node K`) every process encodes every K-th batch and
rank 0 alone writes the rows, in folder order (`dimcli.distributed.encode_rounds`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from dimcli import distributed, train
from dimcli.data import (
    Batch,
    ImageFolder,
    SkipLog,
    auto_workers,
    ensure_readable,
    make_loader,
    make_transform,
)
from dimcli.errors import DimError, UsageError
from dimcli.features import FeatureWriter, feature_format, index_path
from dimcli.modelfile import POOLS, LoadedEncoder, load_encoder
from dimcli.models.encoders import LAYERS

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "BatchEmbedder",
    "EncodeResult",
    "RowSink",
    "encode_batches",
    "encode_folder",
    "resolve_device",
    "resolve_precision",
    "skipped_list_path",
]

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Plain (non-terminal) progress prints a line each time another tenth of the images is done,
# or after this many seconds, whichever comes first.
_PLAIN_EVERY_S = 30.0


# ==== device and precision ====


def resolve_device(name: str) -> torch.device:
    """Turn --device into a torch device, as training does: auto picks CUDA, MPS, then CPU.

    Raises:
        UsageError: an unknown name, or a device this machine does not have.
    """
    name = name.strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise UsageError(f"device must be {DEVICES}, got {name!r}")
    return train.resolve_device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --precision on `device` (None: plain float32).

    auto is bf16 on a CUDA GPU that supports it and float32 elsewhere. Unlike training, auto
    stays float32 on a CPU even where it has bf16 instructions: encoding there is fast
    already, and float32 features are the same on every CPU.

    Raises:
        UsageError: an unknown precision, or bf16 on a GPU without it.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto" and device.type != "cuda":
        return None
    return {"fp32": None, "bf16": torch.bfloat16}[train.resolve_precision(precision, device)]


# ==== one batch at a time ====


class RowSink(Protocol):
    """Where encoded rows go, in order (a `FeatureWriter`, or one rank's share of it)."""

    def write(self, rows: np.ndarray, paths: Sequence[str]) -> None: ...


class BatchEmbedder:
    """uint8 image batch on the CPU -> float32 feature rows (B, D) on the CPU.

    Moves the batch to the device, normalises it there with the model's mean and std (uint8
    transfers are four times smaller than float ones), runs the encoder in inference mode
    under autocast when a dtype is given, and returns float32 rows whatever the precision.

    Args:
        loaded: the encoder; its module is moved to `device` (and to channels_last on CUDA).
        layer, pool: what each row holds, see `LoadedEncoder.features`.
        device: where to run.
        autocast_dtype: torch.bfloat16 for mixed precision, None for float32.
    """

    def __init__(
        self,
        loaded: LoadedEncoder,
        layer: str,
        pool: str,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.loaded = loaded
        self.layer = layer
        self.pool = pool
        self.device = device
        self.autocast_dtype = autocast_dtype
        # Convolutions on NVIDIA tensor cores are fastest with channels-last activations.
        self.channels_last = device.type == "cuda"
        loaded.module.to(device)
        if self.channels_last:
            loaded.module.to(memory_format=torch.channels_last)
        self.dim = loaded.feature_dim(layer, pool)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        b, _, _, _ = images.shape  # (B, 3, S, S) uint8
        x = self.loaded.normalize(images.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mixed = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with mixed:
            rows = self.loaded.features(x, self.layer, self.pool)  # (B, D) float32
        assert rows.shape == (b, self.dim), f"expected ({b}, {self.dim}), got {tuple(rows.shape)}"
        return rows.cpu()


def encode_batches(
    batches: Iterable[Batch],
    *,
    embed: Callable[[Tensor], Tensor],
    keys: Sequence[str],
    sink: RowSink,
    skip_log: SkipLog,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Encode batches in order and give each batch's rows to `sink` before taking the next.

    Args:
        batches: `Batch`es whose indices point into `keys` (in the order rows should go).
        embed: uint8 (B, 3, S, S) -> float32 (B, D) rows, e.g. a `BatchEmbedder`.
        keys: the relative path of each dataset index.
        sink: receives (rows, paths) once per non-empty batch.
        skip_log: records the batch's undecodable files (and raises under "fail").
        on_batch: called with the number of images (encoded + skipped) of each batch.

    Returns:
        Rows written.

    Raises:
        BadImageError: a bad image under the "fail" policy.
    """
    n_rows = 0
    for batch in batches:
        skip_log.record_batch(batch, keys)
        if len(batch):
            rows = embed(batch.images)  # (B, 3, S, S) -> (B, D)
            sink.write(rows.numpy(), [keys[i] for i in batch.indices.tolist()])
            n_rows += len(batch)
        if on_batch is not None:
            on_batch(len(batch) + len(batch.skipped))
    return n_rows


# ==== progress ====


class _Progress:
    """A rich bar with images/s on a terminal, a plain line per tenth otherwise, or nothing."""

    def __init__(self, total: int, enabled: bool, label: str = "encoding") -> None:
        self.total = total
        self.enabled = enabled
        self.label = label
        self.done = 0
        self.start = time.perf_counter()
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._next_tenth = 1
        self._last_line = self.start
        if enabled and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]} img/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> _Progress:
        self.start = self._last_line = time.perf_counter()
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="-")
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=n, rate=f"{rate:.0f}")
            return
        tenth = self.done * 10 // max(self.total, 1)
        if self.done < self.total and (
            tenth >= self._next_tenth or now - self._last_line >= _PLAIN_EVERY_S
        ):
            self._next_tenth = tenth + 1
            self._last_line = now
            percent = 100 * self.done / max(self.total, 1)
            print(
                f"{self.label} {self.done}/{self.total} images ({percent:.0f}%) {rate:.1f} img/s",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()


# ==== the whole folder ====


@dataclass(frozen=True)
class EncodeResult:
    """What `encode_folder` wrote.

    Attributes:
        n_rows: feature rows written (images encoded).
        dim: width of each row.
        n_skipped: images that could not be decoded (listed in `skipped_file`).
        seconds: wall time of the decode-and-encode pass.
        out: the feature file.
        skipped_file: `<out stem>.skipped.txt` when images were skipped, else None.
    """

    n_rows: int
    dim: int
    n_skipped: int
    seconds: float
    out: Path
    skipped_file: Path | None = None

    @property
    def images_per_second(self) -> float:
        """Images (encoded and skipped) per second of the pass."""
        return (self.n_rows + self.n_skipped) / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """One line for the terminal: rows, dims, skipped, speed, where."""
        extra = f" + {index_path(self.out).name}" if self.out.suffix.lower() == ".npy" else ""
        skipped = f"{self.n_skipped} skipped"
        if self.skipped_file is not None:
            skipped += f" (listed in {self.skipped_file})"
        return (
            f"wrote {self.n_rows} rows x {self.dim} dims to {self.out}{extra}; {skipped}; "
            f"{self.images_per_second:.1f} images/s"
        )


def skipped_list_path(out: Path) -> Path:
    """Where the list of skipped images of an output goes: feats.npy -> feats.skipped.txt."""
    out = Path(out)
    return out.with_name(out.stem + ".skipped.txt")


def encode_folder(
    images: Path,
    out: Path,
    *,
    model: str | os.PathLike[str] | LoadedEncoder = "runs/latest",
    layer: str = "y",
    pool: str = "none",
    batch_size: int = 256,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    on_bad_image: Literal["skip", "fail"] = "skip",
    progress: bool = True,
    overwrite: bool = False,
) -> EncodeResult:
    """Encode every image under `images` into the feature file `out` (.npy, .npz or .csv).

    Rows follow the sorted relative paths of the images; undecodable images are skipped
    (listed in `<out stem>.skipped.txt` beside `out`) or stop the encode (`on_bad_image`
    "fail"). Rows stream to a temporary file that replaces `out` only once all are written.

    Args:
        images: the folder, searched recursively.
        out: the feature file; its extension picks the format (see `dimcli.features`).
        model: a run folder, a .safetensors model file, or an already loaded encoder
            (which is moved to `device`).
        layer: "y", "fc" or "conv" (flattened, or averaged over locations with pool "avg").
        pool: "none" or "avg" (conv only).
        batch_size: images per forward pass.
        workers: decoding processes; None picks from the CPU count.
        device: auto, cpu, cuda, cuda:N or mps.
        precision: auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16. Rows are float32.
        on_bad_image: "skip" or "fail".
        progress: show a progress bar (plain lines when stderr is not a terminal).
        overwrite: replace an existing `out`; without it an existing file is an error.

    Raises:
        DimError: bad folder, output or options; ModelFileError for a bad model file;
            BadImageError for a bad image under "fail".
    """
    images, out = Path(images), Path(out)

    # ==== check everything cheap before any work ====
    feature_format(out)
    if layer not in LAYERS:
        raise UsageError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    if pool not in POOLS:
        raise UsageError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if pool == "avg" and layer != "conv":
        raise UsageError(
            f"--pool avg averages a conv map over locations, so it needs --layer conv "
            f"(got --layer {layer}); drop --pool or use --layer conv"
        )
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise UsageError(f"workers must be 0 (decode in the main process) or more, got {workers}")
    skip_log = SkipLog(on_bad_image)

    def refuse_existing() -> None:
        if out.exists() and not overwrite:
            raise DimError(
                f"output {out} already exists; pass --overwrite to replace it or choose another -o"
            )

    # One process, or one of torchrun's: then rank 0 alone checks the output and writes it.
    ctx = distributed.setup(device)
    ctx.on_main(refuse_existing)
    if not ctx.is_main:
        skip_log.warn = _silent
    torch_device = ctx.device if ctx.device is not None else resolve_device(device)
    autocast_dtype = resolve_precision(precision, torch_device)
    loaded = model if isinstance(model, LoadedEncoder) else load_encoder(model)

    # ==== data: the same decoding and eval transform as training ====
    dataset = ImageFolder(images, transform=make_transform(loaded.image_size, "none", train=False))
    ensure_readable(dataset)
    n_batches = math.ceil(len(dataset) / batch_size)
    rounds = math.ceil(n_batches / ctx.world_size)  # batches per process
    n_workers = min(auto_workers() if workers is None else workers, rounds)
    loader = make_loader(
        dataset,
        batch_size,
        shuffle=False,
        drop_last=False,
        workers=n_workers,
        device=torch_device,
        seed=0,
        sampler=(
            distributed.RoundRobinBatches(len(dataset), batch_size, ctx.rank, ctx.world_size)
            if ctx.enabled
            else None
        ),
    )
    embed = BatchEmbedder(loaded, layer, pool, torch_device, autocast_dtype)

    # ==== encode, streaming rows to the temporary file ====
    # Limitation: a killed encode (SIGKILL, power loss) cannot clean up after itself: its
    # hidden `.<name>.partial-<pid>` files stay beside the output (never under its name) until
    # removed by hand; see docs/limitations.md
    with (
        _Progress(len(dataset), progress and ctx.is_main) as bar,
        (
            FeatureWriter(out, dim=embed.dim, capacity=len(dataset))
            if ctx.is_main
            else contextlib.nullcontext()
        ) as writer,
    ):
        if ctx.enabled:
            n_rows = distributed.encode_rounds(
                loader,
                rounds=rounds,
                embed=embed,
                keys=dataset.keys,
                sink=writer,
                skip_log=skip_log,
                on_batch=bar.advance,
                ctx=ctx,
            )
        else:
            assert writer is not None, "a single process is rank 0"
            n_rows = encode_batches(
                loader,
                embed=embed,
                keys=dataset.keys,
                sink=writer,
                skip_log=skip_log,
                on_batch=bar.advance,
            )
    seconds = time.perf_counter() - bar.start

    # ==== list the skipped images beside the output (a stale list would mislead) ====
    skipped_file = skipped_list_path(out)
    if ctx.is_main and skip_log.entries:
        # SkipLog writes its list under FILE_NAME in a folder; name it after the output.
        skip_log.FILE_NAME = skipped_file.name
        skip_log.write(skipped_file.parent)
    elif ctx.is_main:
        skipped_file.unlink(missing_ok=True)
    ctx.barrier()  # the output is in place on every rank's return
    return EncodeResult(
        n_rows=n_rows,
        dim=embed.dim,
        n_skipped=len(skip_log.entries),
        seconds=seconds,
        out=out,
        skipped_file=skipped_file if skip_log.entries else None,
    )


def _silent(_message: str) -> None:
    """Warnings of processes other than rank 0 (rank 0 reports every rank's bad files)."""
