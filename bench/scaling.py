"""Scaling: one training step as the batch grows, and `dim encode` as the folder grows.

- step: time and peak memory of `dimcli.train.train_step` (conv32 DIM(L)) at each batch size.
  The local objective scores every global vector against every local vector of the batch,
  N x N x HW scores, so its work grows with N^2 * HW while the encoder's grows with N.
- encode: time and peak resident memory of `dimcli.encode.encode_folder` at each folder size.
  Rows stream to disk, so time should grow linearly with the images and memory stay flat.

Every point runs in a fresh child process, so that peak memory (VmHWM of the child; on CUDA
the allocator's peak) belongs to that point alone.

    .venv/bin/python bench/scaling.py                            # batches 16..256, 1k/4k/16k images
    .venv/bin/python bench/scaling.py --batches 32,64,128 --sizes 1000,4000 --mi-units 2048
    .venv/bin/python bench/scaling.py --smoke --data DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LoadSampler, cifar_folder, machine_line, markdown_table


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak anonymous resident memory (RssAnon), MiB, sampled every 10 ms while in the block.

    VmHWM also counts the pages of memory-mapped files, here the .npy being written, which the
    kernel can drop at any time; RssAnon is the process's own memory, which must stay flat.
    Linux only: elsewhere `peak_mib` stays None.
    """

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_mib() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            now = self.now_mib()
            if now is not None:
                self.peak_mib = max(self.peak_mib or 0.0, now)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ==== child processes: one measurement each, printed as one JSON line ====


def child_step(batch: int, mi_units: int, steps: int, device: str, threads: int | None) -> None:
    import torch
    from _common import build_step, random_images

    from dimcli.train import train_step

    if threads:
        torch.set_num_threads(threads)
    models, opts, cfg = build_step(mi_units=mi_units, device=device)
    images = random_images(batch).to(cfg.device)
    base = peak_rss_mib()
    train_step(models, opts, images, cfg)  # warm-up: allocator, Adam state
    if cfg.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(models, opts, images, cfg)
    if cfg.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    out = {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "base_rss_mib": base}
    if cfg.device.type == "cuda":
        out["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def child_encode(folder: str, out: str, layer: str, threads: int | None) -> None:
    import torch

    from dimcli.encode import encode_folder
    from dimcli.modelfile import save_encoder
    from dimcli.models import build_encoder

    if threads:
        torch.set_num_threads(threads)
    model = Path(out).with_name("encoder.safetensors")
    if not model.exists():
        torch.manual_seed(0)
        prep = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "centre crop"}
        save_encoder(build_encoder("conv32"), model, preprocessing=prep)
    base = peak_rss_mib()
    base_anon = AnonPeak.now_mib()
    with AnonPeak() as anon:
        res = encode_folder(
            Path(folder),
            Path(out),
            model=model,
            layer=layer,
            device="cpu",
            progress=False,
            overwrite=True,
        )
    print(
        json.dumps(
            {
                "seconds": res.seconds,
                "rows": res.n_rows,
                "peak_rss_mib": peak_rss_mib(),
                "base_rss_mib": base,
                "peak_anon_mib": anon.peak_mib,
                "base_anon_mib": base_anon,
                "file_mib": Path(out).stat().st_size / 2**20,
            }
        )
    )


def _anon(r: dict[str, Any]) -> str:
    """Peak anonymous RSS over the child's start (model loaded), or "-" where unmeasured."""
    if r.get("peak_anon_mib") is None or r.get("base_anon_mib") is None:
        return "-"
    return f"{r['peak_anon_mib'] - r['base_anon_mib']:.0f}"


def run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"child {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ==== folders ====


def flat_subset(src: Path, dst: Path, n: int) -> Path:
    """`n` images of `src` (round-robin over classes, sorted) hard-linked into `dst`/<class>/."""
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    per = [sorted(c.glob("*.jpg")) for c in classes]
    picked = 0
    for i in range(max(len(f) for f in per)):
        for c, files in zip(classes, per, strict=True):
            if picked == n:
                return dst
            if i < len(files):
                (dst / c.name).mkdir(parents=True, exist_ok=True)
                try:
                    (dst / c.name / files[i].name).hardlink_to(files[i])
                except OSError:
                    shutil.copy2(files[i], dst / c.name / files[i].name)
                picked += 1
    if picked < n:
        sys.exit(f"error: {src} has only {picked} images, fewer than {n}")
    return dst


# ==== main ====


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, help="CIFAR-10 folder with train/ (default: the archive)")
    ap.add_argument("--batches", default="16,32,64,128,256")
    ap.add_argument("--mi-units", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per batch size")
    ap.add_argument("--sizes", default="1000,4000,16000", help="folder sizes for encode")
    ap.add_argument("--layer", default="conv", help="encode layer (conv writes the widest rows)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch intra-op threads in the children")
    ap.add_argument("--smoke", action="store_true", help="batches 4,8; folders of 20 and 40")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = str(args.threads or 0)

    if args.child:
        kind, *rest = args.child
        t = int(rest[-1]) or None
        if kind == "step":
            child_step(int(rest[0]), int(rest[1]), int(rest[2]), rest[3], t)
        else:
            child_encode(rest[0], rest[1], rest[2], t)
        return 0

    if args.smoke:
        args.batches, args.mi_units, args.steps, args.sizes = "4,8", 64, 1, "20,40"
    load = LoadSampler()

    # ---- training step vs batch ----
    step_rows: list[list[Any]] = []
    first: dict[str, Any] | None = None
    for batch in [int(b) for b in args.batches.split(",")]:
        r = run_child(
            "--child",
            "step",
            str(batch),
            str(args.mi_units),
            str(args.steps),
            args.device,
            threads,
        )
        load.sample()
        first = first or {**r, "batch": batch}
        growth = batch / first["batch"]
        step_rows.append(
            [
                batch,
                f"{1000 * r['seconds']:.0f}",
                f"{batch / r['seconds']:.0f}",
                f"{r['seconds'] / first['seconds']:.1f}x (N {growth:g}x, N^2 {growth**2:g}x)",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['peak_rss_mib'] - r['base_rss_mib']:.0f}",
                f"{r['peak_device_mib']:.0f}" if "peak_device_mib" in r else "-",
            ]
        )
        print(
            f"step batch {batch}: {1000 * r['seconds']:.0f} ms, peak RSS "
            f"{r['peak_rss_mib']:.0f} MiB",
            flush=True,
        )

    # ---- encode vs folder size ----
    enc_rows: list[list[Any]] = []
    root = cifar_folder(args.data)
    work = Path(tempfile.mkdtemp(prefix="dimcli-scaling-"))
    try:
        base_time: float | None = None
        base_n = 0
        for n in [int(s) for s in args.sizes.split(",")]:
            folder = flat_subset(root / "train", work / f"images-{n}", n)
            r = run_child(
                "--child", "encode", str(folder), str(work / f"f{n}.npy"), args.layer, threads
            )
            load.sample()
            if base_time is None:
                base_time, base_n = r["seconds"], n
            enc_rows.append(
                [
                    n,
                    f"{r['seconds']:.1f}",
                    f"{n / r['seconds']:.0f}",
                    f"{r['seconds'] / base_time:.2f}x (images {n / base_n:g}x)",
                    f"{r['peak_rss_mib']:.0f}",
                    f"{r['peak_rss_mib'] - r['base_rss_mib']:.0f}",
                    _anon(r),
                    f"{r['file_mib']:.1f}",
                ]
            )
            print(
                f"encode {n}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"Training step, conv32 DIM(L) JSD, mi_units {args.mi_units}, {args.device}:")
    print()
    print(
        markdown_table(
            [
                "batch",
                "ms/step",
                "img/s",
                "time vs first",
                "peak RSS MiB",
                "RSS over model MiB",
                "peak device MiB",
            ],
            step_rows,
        )
    )
    print()
    print(f"Encode (layer {args.layer}, .npy), one child process per folder size:")
    print("(peak RSS counts the memory-mapped output's pages; anon RSS is the process's own)")
    print()
    print(
        markdown_table(
            [
                "images",
                "seconds",
                "img/s",
                "time vs first",
                "peak RSS MiB",
                "RSS over model MiB",
                "anon RSS over model MiB",
                "output MiB",
            ],
            enc_rows,
        )
    )
    print()
    print(
        f"{machine_line()}; mean 1-min load during the run {load.mean:.2f} (peak {load.peak:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
