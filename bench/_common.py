"""Helpers shared by the bench/ scripts: the CIFAR-10 folder, the machine, markdown tables.

Not part of the dimcli package; the scripts import it as `_common` (bench/ is on sys.path
when a script runs from it, and tests add it by hand).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = (REPO / ".." / "shared" / "data" / "cifar10.tar.gz").resolve()
CACHE = Path("/tmp/dimcli-cifar10")
_DONE_MARK = ".dimcli-unpacked"


# ==== data ====


def cifar_folder(data: Path | None = None, archive: Path = ARCHIVE, cache: Path = CACHE) -> Path:
    """The CIFAR-10 folder (train/<class>/*.jpg, test/<class>/*.jpg): `data`, or the archive
    unpacked into `cache` once (a marker file tells a complete unpack from a cut-short one).

    Raises:
        SystemExit: neither a folder nor the archive is there.
    """
    if data is not None:
        if not (data / "train").is_dir():
            sys.exit(f"error: {data} has no train/ folder; pass --data DIR with DIR/train/<class>")
        return data
    if (cache / _DONE_MARK).is_file():
        return cache
    if not archive.is_file():
        sys.exit(f"error: CIFAR-10 archive not found at {archive}; pass --data DIR instead")
    print(f"unpacking {archive} into {cache} (once) ...", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(cache, filter="data")
    (cache / _DONE_MARK).write_text("complete\n")
    return cache


def subset_folder(src: Path, dst: Path, per_class: int | None) -> Path:
    """A folder with the first `per_class` images (sorted by name) of each class of `src`.

    Files are hard links where the file system allows (else copies), so a 10k-image subset
    costs no space. `per_class=None` returns `src` itself. An existing `dst` with the same
    number of files is reused.
    """
    if per_class is None:
        return src
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    wanted = {c.name: sorted(c.glob("*.jpg"))[:per_class] for c in classes}
    total = sum(len(files) for files in wanted.values())
    if dst.is_dir() and sum(1 for _ in dst.rglob("*.jpg")) == total:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for name, files in wanted.items():
        (dst / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(f, dst / name / f.name)
            except OSError:
                shutil.copy2(f, dst / name / f.name)
    return dst


# ==== the machine ====


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """What the numbers came from: CPU, cores, torch and Python versions, load average now."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpus": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": list(os.getloadavg()),
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One markdown line naming the machine."""
    m = info or machine()
    load = ", ".join(f"{x:.2f}" for x in m["loadavg"])
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ""
    return (
        f"Machine: {m['cpu']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads){gpu}; "
        f"torch {m['torch']}, Python {m['python']}; load average {load}"
    )


class LoadSampler:
    """Mean 1-minute load average over a stretch of work (sampled at each `sample()`)."""

    def __init__(self) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    @property
    def peak(self) -> float:
        return max(self.samples)


# ==== output ====


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A GitHub markdown table; floats get `digits` decimals, None shows as "-"."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` then `t[0]` holds the seconds the block took."""
    out = [0.0]
    start = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - start


# ==== a training step outside `train` ====


def build_step(
    *,
    mi_units: int,
    estimator: str = "jsd",
    encoder: str = "conv32",
    device: str = "cpu",
    precision: str = "auto",
    seed: int = 0,
) -> tuple[Any, Any, Any]:
    """(models, optimizers, step config) as `dim train` builds them for DIM(L), for timing
    `dimcli.train.train_step` on tensors already in memory."""
    import torch

    from dimcli.models import PRESETS, DIMModel, PriorDiscriminator, build_encoder
    from dimcli.train import (
        _AMP_DTYPES,
        Models,
        Optimizers,
        StepConfig,
        resolve_channels_last,
        resolve_device,
        resolve_precision,
    )

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    channels_last = resolve_channels_last(None, dev)
    alpha, beta, gamma = PRESETS["dim-l"]
    torch.manual_seed(seed)
    dim = DIMModel(
        build_encoder(encoder),
        estimator=estimator,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        mi_units=mi_units,
    ).to(dev)
    if channels_last:
        dim = dim.to(memory_format=torch.channels_last)
    disc = PriorDiscriminator(dim.encoder.feature_dim).to(dev)
    opts = Optimizers(
        torch.optim.Adam(dim.parameters(), lr=1e-4, betas=(0.5, 0.999)),
        torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.999)),
        None,
    )
    cfg = StepConfig(
        device=dev, amp_dtype=_AMP_DTYPES.get(prec), channels_last=channels_last, gp_weight=0.0
    )
    return Models(dim, disc), opts, cfg


def random_images(n: int, size: int = 32, seed: int = 0) -> Any:
    """(n, 3, size, size) uint8 noise, the shape and dtype the loader yields."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
