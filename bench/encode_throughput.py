"""Encode throughput: `dim encode` against decode-only and forward-only on the same folder.

- decode only: the loader `encode_folder` builds (same dataset, transform, batch, automatic
  worker count), iterated to the end with no model;
- forward only: the encoder (`BatchEmbedder`, what `encode_folder` runs) on uint8 tensors
  already in memory, as many images as the folder holds;
- encode: `dimcli.encode.encode_folder` into a .npy file, end to end.

The slower of the first two bounds the third; the target is encode >= 0.8 x that bound.

    .venv/bin/python bench/encode_throughput.py                  # CIFAR-10 test split (10k)
    .venv/bin/python bench/encode_throughput.py --layers y,conv --per-class 500
    .venv/bin/python bench/encode_throughput.py --smoke --data DIR

The encoder is conv32 at random initialisation (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LoadSampler,
    cifar_folder,
    machine_line,
    markdown_table,
    random_images,
    subset_folder,
)

from dimcli.data import ImageFolder, auto_workers, make_loader, make_transform
from dimcli.encode import BatchEmbedder, encode_folder
from dimcli.modelfile import load_encoder, save_encoder
from dimcli.models import build_encoder

TARGET = 0.8


def make_model(path: Path) -> Path:
    """A conv32 model file at random initialisation."""
    torch.manual_seed(0)
    encoder = build_encoder("conv32")
    prep = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "centre crop"}
    save_encoder(encoder, path, preprocessing=prep)
    return path


def decode_only(folder: Path, batch: int, workers: int) -> float:
    """Images/s of the encode loader with no model behind it."""
    dataset = ImageFolder(folder, transform=make_transform(32, "none", train=False))
    n_workers = min(workers, math.ceil(len(dataset) / batch))
    loader = make_loader(
        dataset,
        batch,
        shuffle=False,
        drop_last=False,
        workers=n_workers,
        device=torch.device("cpu"),
        seed=0,
    )
    start = time.perf_counter()
    n = sum(len(b) + len(b.skipped) for b in loader)
    return n / (time.perf_counter() - start)


def forward_only(model: Path, layer: str, n: int, batch: int) -> float:
    """Images/s of the encoder on in-memory uint8 batches (one warm-up batch first)."""
    embed = BatchEmbedder(load_encoder(model), layer, "none", torch.device("cpu"))
    images = random_images(batch)
    embed(images)
    start = time.perf_counter()
    done = 0
    while done < n:
        done += len(embed(images[: min(batch, n - done)]))
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, help="CIFAR-10 folder with test/ (default: the archive)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--per-class", type=int, default=0, help="images per class; 0 = all")
    ap.add_argument("--layers", default="y,conv")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="5 images per class, layer y")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.per_class, args.layers = 5, "y"

    root = cifar_folder(args.data)
    work = Path(tempfile.mkdtemp(prefix="dimcli-encode-bench-"))
    load = LoadSampler()
    rows: list[list[Any]] = []
    try:
        folder = subset_folder(root / args.split, work / "images", args.per_class or None)
        n_images = sum(1 for _ in folder.rglob("*.jpg"))
        model = make_model(work / "encoder.safetensors")
        workers = auto_workers()
        for layer in args.layers.split(","):
            decode = decode_only(folder, args.batch_size, workers)
            load.sample()
            forward = forward_only(model, layer, n_images, args.batch_size)
            load.sample()
            res = encode_folder(
                folder,
                work / f"{layer}.npy",
                model=model,
                layer=layer,
                batch_size=args.batch_size,
                device="cpu",
                progress=False,
                overwrite=True,
            )
            load.sample()
            bound = min(decode, forward)
            ratio = res.images_per_second / bound
            rows.append(
                [
                    layer,
                    res.dim,
                    n_images,
                    workers,
                    f"{decode:.0f}",
                    f"{forward:.0f}",
                    f"{res.images_per_second:.0f}",
                    f"{ratio:.2f}",
                    "yes" if ratio >= TARGET else "no",
                ]
            )
            print(
                f"layer {layer}: decode {decode:.0f}, forward {forward:.0f}, encode "
                f"{res.images_per_second:.0f} img/s, ratio {ratio:.2f}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    headers = [
        "layer",
        "dims",
        "images",
        "workers",
        "decode only img/s",
        "forward only img/s",
        "encode img/s",
        "encode / slower",
        f">= {TARGET}",
    ]
    print()
    print(markdown_table(headers, rows))
    print()
    print(
        f"{machine_line()}; mean 1-min load during the run {load.mean:.2f} (peak {load.peak:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
