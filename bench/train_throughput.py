"""Training throughput: `dim train` end to end against the compute-only ceiling.

End to end is `dimcli.train.train` on a folder of CIFAR-10 JPEGs: decoding in the automatic
number of loader workers, the step, logging, the run folder. Its images/s is read from the
run's metrics.jsonl, leaving out the first logging interval (worker start-up, warm-up).

The ceiling is `dimcli.train.train_step` of the same model, batch and precision settings on
uint8 tensors already in memory: no decoding at all. It is timed before and after the end-to-
end run and averaged, so that a change in machine load during the run shows in both.

    .venv/bin/python bench/train_throughput.py                 # conv32, mi 512/2048, batch 64/256
    .venv/bin/python bench/train_throughput.py --mi-units 512 --batches 64 --steps 20
    .venv/bin/python bench/train_throughput.py --smoke --data DIR

Target: end to end >= 0.9 x the ceiling on the CPU with the automatic worker count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LoadSampler,
    build_step,
    cifar_folder,
    machine_line,
    markdown_table,
    random_images,
    subset_folder,
)

from dimcli.data import auto_workers
from dimcli.settings import TrainSettings
from dimcli.train import METRICS_FILE, train, train_step

TARGET = 0.9


def ceiling(mi_units: int, batch: int, warmup: int, steps: int, device: str) -> float:
    """Images/s of train_step alone on in-memory uint8 batches."""
    models, opts, cfg = build_step(mi_units=mi_units, device=device)
    images = random_images(batch).to(cfg.device)
    for _ in range(warmup):
        train_step(models, opts, images, cfg)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(models, opts, images, cfg)
    return batch * steps / (time.perf_counter() - start)


def end_to_end(
    folder: Path, mi_units: int, batch: int, warmup: int, steps: int, device: str, work: Path
) -> dict[str, float]:
    """Images/s and data-wait share of `train` after its first logging interval."""
    out = work / f"run-mi{mi_units}-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    log_every = max(1, min(warmup, steps))
    settings = TrainSettings(
        images=folder,
        mi_units=mi_units,
        batch_size=batch,
        max_steps=warmup + steps,
        log_every=log_every,
        save_every=10**9,  # no checkpoint inside the measured window
        device=device,
        out=out,
    )
    train(settings, console=Console(quiet=True), verbosity=-1)
    records = [
        json.loads(line)
        for line in (out / METRICS_FILE).read_text().splitlines()
        if '"kind": "step"' in line
    ]
    measured = [r for r in records if r["step"] > warmup] or records[-1:]
    seconds = sum(log_every * batch / r["images_per_s"] for r in measured)
    return {
        "images_per_s": len(measured) * log_every * batch / seconds,
        "data_wait": sum(r["data_wait"] for r in measured) / len(measured),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, help="CIFAR-10 folder with train/ (default: the archive)")
    ap.add_argument("--mi-units", default="512,2048")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of every measurement")
    ap.add_argument("--steps", type=int, default=20, help="measured steps")
    ap.add_argument("--per-class", type=int, default=500, help="training images per class")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="2 warm-up + 2 steps, batch 8, mi 64")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.mi_units, args.batches, args.warmup, args.steps = "64", "8", 2, 2
    mi_list = [int(v) for v in args.mi_units.split(",")]
    batch_list = [int(v) for v in args.batches.split(",")]

    root = cifar_folder(args.data)
    work = Path(tempfile.mkdtemp(prefix="dimcli-train-bench-"))
    folder = subset_folder(root / "train", work / "images", args.per_class)
    load = LoadSampler()
    rows: list[list[Any]] = []
    raw: list[dict[str, Any]] = []
    try:
        for mi in mi_list:
            for batch in batch_list:
                before = ceiling(mi, batch, args.warmup, args.steps, args.device)
                load.sample()
                e2e = end_to_end(folder, mi, batch, args.warmup, args.steps, args.device, work)
                load.sample()
                after = ceiling(mi, batch, args.warmup, args.steps, args.device)
                load.sample()
                top = (before + after) / 2
                ratio = e2e["images_per_s"] / top
                rows.append(
                    [
                        mi,
                        batch,
                        auto_workers(),
                        f"{top:.1f} ({before:.1f} / {after:.1f})",
                        f"{e2e['images_per_s']:.1f}",
                        f"{ratio:.2f}",
                        f"{100 * e2e['data_wait']:.0f}%",
                        "yes" if ratio >= TARGET else "no",
                    ]
                )
                raw.append({"mi_units": mi, "batch": batch, "ceiling": top, **e2e})
                print(
                    f"mi {mi} batch {batch}: ceiling {top:.1f}, end to end "
                    f"{e2e['images_per_s']:.1f} img/s, ratio {ratio:.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    headers = [
        "mi_units",
        "batch",
        "workers",
        "ceiling img/s (before / after)",
        "end to end img/s",
        "ratio",
        "data wait",
        f">= {TARGET}",
    ]
    print()
    print(markdown_table(headers, rows))
    print()
    print(
        f"{machine_line()}; mean 1-min load during the run {load.mean:.2f} (peak {load.peak:.2f})"
    )
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
