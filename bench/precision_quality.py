"""Speed and learning quality of training precisions: fp32 vs bf16 autocast (+ channels_last,
+ torch.compile) for conv32 DIM(L) with the JSD estimator on a CIFAR-10 subset.

Every configuration trains from the same initial weights on the same batches for the same
number of steps with `dimcli.train.train_step` (the step `dim train` runs); then the frozen
encoder (evaluated in fp32) is linear-probed with `dimcli.probe.linear_probe` on its conv, fc
and y features. Prints a markdown table of training images/s and probe top-1 accuracy, with a
random-init row for reference.

    .venv/bin/python bench/precision_quality.py              # CIFAR-10 subset from the archive
    .venv/bin/python bench/precision_quality.py --data DIR   # DIR/{train,test}/<class>/*
    .venv/bin/python bench/precision_quality.py --configs fp32,bf16-cl,bf16-cl-compile --seeds 0,1

Images are decoded once into memory, so images/s measures the training step, not decoding.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dimcli.models import DIMModel, PriorDiscriminator, build_encoder
from dimcli.probe import linear_probe
from dimcli.train import Models, Optimizers, StepConfig, cpu_supports_bf16, train_step

ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10.tar.gz"


@dataclass(frozen=True)
class Config:
    name: str
    precision: str  # "fp32" | "bf16"
    channels_last: bool
    compile: bool


CONFIGS = {
    "fp32": Config("fp32", "fp32", False, False),
    "fp32-cl": Config("fp32 + channels_last", "fp32", True, False),
    "bf16-cl": Config("bf16 autocast + channels_last", "bf16", True, False),
    "bf16-cl-compile": Config("bf16 + channels_last + compile", "bf16", True, True),
}


# ==== data ====


def _decode(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))  # (32, 32, 3) uint8


def load_cifar(source: Path, train_per_class: int, test_per_class: int) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): uint8 (N, 3, 32, 32) images and int64 labels."""
    quota = {"train": train_per_class, "test": test_per_class}
    found: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    counts: dict[tuple[str, str], int] = {}

    def take(split: str, label: str, raw: bytes) -> None:
        if counts.get((split, label), 0) < quota[split]:
            counts[(split, label)] = counts.get((split, label), 0) + 1
            found[split].append((label, _decode(raw)))

    if source.is_dir():
        for split in quota:
            for path in sorted((source / split).glob("*/*")):
                take(split, path.parent.name, path.read_bytes())
    else:
        with tarfile.open(source, "r|gz") as tar:  # stream: stop once every quota is met
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) == 3 and parts[0] in quota:
                    fh = tar.extractfile(member)
                    assert fh is not None, f"{member.name} has no data"
                    take(parts[0], parts[1], fh.read())
                full = [n for (s, _), n in counts.items() if n >= quota[s]]
                if len(full) == 20:
                    break

    classes = sorted({label for label, _ in found["train"]})
    out = []
    for split in ("train", "test"):
        images = np.stack([img for _, img in found[split]]).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        labels = np.array([classes.index(label) for label, _ in found[split]], dtype=np.int64)
        out += [np.ascontiguousarray(images), labels]
    return tuple(out)


# ==== training ====


def train(
    cfg: Config, x: torch.Tensor, steps: int, batch: int, seed: int, mi_units: int, warmup: int
) -> tuple[torch.nn.Module, float]:
    """Train conv32 DIM(L) JSD; returns the encoder and images/s after `warmup` steps."""
    torch.manual_seed(seed)
    encoder = build_encoder("conv32")
    dim = DIMModel(encoder, estimator="jsd", alpha=0.0, beta=1.0, gamma=0.1, mi_units=mi_units)
    disc = PriorDiscriminator(encoder.feature_dim)
    if cfg.channels_last:
        dim = dim.to(memory_format=torch.channels_last)
    if cfg.compile:
        dim.encoder.compile()
    models = Models(dim, disc)
    opts = Optimizers(
        torch.optim.Adam(dim.parameters(), lr=1e-4, betas=(0.5, 0.999)),
        torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.999)),
        None,
    )
    step_cfg = StepConfig(
        device=torch.device("cpu"),
        amp_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
        channels_last=cfg.channels_last,
        gp_weight=0.0,
    )
    order = torch.Generator().manual_seed(seed + 1)  # same batches for every config
    n = x.shape[0]
    perm = torch.randperm(n, generator=order)
    pos, timed, start = 0, 0, 0.0
    for step in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=order), 0
        images = x[perm[pos : pos + batch]]
        pos += batch
        if step == warmup:
            start = time.perf_counter()
        out = train_step(models, opts, images, step_cfg)
        assert not out.bad, f"{cfg.name}: non-finite {out.bad} at step {step}"
        if step >= warmup:
            timed += batch
    rate = timed / (time.perf_counter() - start)
    return encoder, rate


@torch.no_grad()
def features(encoder: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """fp32 features of uint8 images at conv, fc and y, flattened."""
    encoder.eval()
    parts: dict[str, list[torch.Tensor]] = {"conv": [], "fc": [], "y": []}
    for i in range(0, x.shape[0], 256):
        xb = x[i : i + 256].float().div(255).sub(0.5).div(0.5)  # the paper's normalisation
        out = encoder(xb.contiguous())
        for k in parts:
            parts[k].append(out[k].float().flatten(1))
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def probe(
    encoder: torch.nn.Module, data: tuple[np.ndarray, ...], seed: int, l2: tuple[float, ...]
) -> dict[str, float]:
    x_train, y_train, x_test, y_test = data
    f_train = features(encoder, torch.from_numpy(x_train))
    f_test = features(encoder, torch.from_numpy(x_test))
    n_classes = int(y_train.max()) + 1
    acc = {}
    for layer in ("conv", "fc", "y"):
        result = linear_probe(
            f_train[layer], y_train, f_test[layer], y_test, n_classes, seed, l2_grid=l2
        )
        acc[layer] = result.top1
    return acc


# ==== main ====


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ARCHIVE, help="CIFAR-10 folder or tar.gz")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mi-units", type=int, default=2048)
    parser.add_argument("--seeds", default="0", help="comma-separated; results are averaged")
    parser.add_argument("--configs", default="fp32,bf16-cl", help=", ".join(CONFIGS))
    parser.add_argument(
        "--l2",
        default="1e-3",
        help="probe L2 strength; several (comma-separated) are chosen between on a validation "
        "split, which costs one fit each",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.exists():
        sys.exit(f"error: {args.data} not found; pass --data with a CIFAR-10 folder or archive")
    t0 = time.perf_counter()
    data = load_cifar(args.data, args.train_per_class, args.test_per_class)
    x_train = torch.from_numpy(data[0])
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [CONFIGS[name] for name in args.configs.split(",")]
    l2 = tuple(float(v) for v in args.l2.split(","))
    print(
        f"# conv32 DIM(L) JSD, {len(data[0])} train / {len(data[2])} test CIFAR-10 images, "
        f"{args.steps} steps of {args.batch_size}, mi_units {args.mi_units}, seeds {seeds}, "
        f"probe L2 {l2}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 instructions: {cpu_supports_bf16()} "
        f"(data loaded in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        rows.append(
            (
                "random init (no training)",
                seed,
                float("nan"),
                probe(build_encoder("conv32"), data, seed, l2),
            )
        )
    for cfg in configs:
        for seed in seeds:
            encoder, rate = train(
                cfg, x_train, args.steps, args.batch_size, seed, args.mi_units, args.warmup
            )
            acc = probe(encoder, data, seed, l2)
            rows.append((cfg.name, seed, rate, acc))
            print(f"  {cfg.name} seed {seed}: {rate:.0f} img/s, probe {acc}", flush=True)

    print("\n| configuration | train img/s | linear probe top-1: conv | fc | y |")
    print("|---|---:|---:|---:|---:|")
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        rate = statistics.mean(r[2] for r in mine)
        accs = [statistics.mean(r[3][k] for r in mine) for k in ("conv", "fc", "y")]
        rate_text = "-" if rate != rate else f"{rate:.0f}"
        print(f"| {name} | {rate_text} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")


if __name__ == "__main__":
    main()
