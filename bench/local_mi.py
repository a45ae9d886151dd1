"""Benchmark the local-MI objective: reference vs torch.compile(reference) vs fused Triton.

Usage (from the repository root):

    python bench/local_mi.py                   # full grid on CUDA, under 5 minutes
    python bench/local_mi.py --quick           # a small subset
    python bench/local_mi.py --estimators nce --dtype float32 --peak-tflops 495

For every estimator and shape (N images, HW locations, D channels) it times one forward +
backward pass of `dimcli.objectives.local_mi` with kernel="reference", the same function under
torch.compile, and kernel="fused"; it reports the peak memory each allocates on top of its
inputs, and the fused forward's throughput on the score GEMM (2*N*N*HW*D flops) against the
device's dense peak. Without a CUDA device it times the reference path only, at small shapes.

Targets, at N >= 1024 and HW >= 64: fused >= 2x faster than the reference and >= 5x less peak
memory; the score GEMM above 50% of the dense peak at the largest shape.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dimcli.objectives import local_mi

ESTIMATORS = ("jsd", "nce", "dv")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
METHODS = ("reference", "compiled", "fused")

# Dense (no sparsity) tensor-core peaks in TFLOP/s: (16-bit, TF32, plain float32).
PEAKS = {
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100": (989.0, 495.0, 67.0),
    "H200": (989.0, 495.0, 67.0),
    "H800": (989.0, 495.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
}

TARGET_SPEEDUP = 2.0
TARGET_MEMORY = 5.0
TARGET_PEAK_SHARE = 0.5

Fn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Cell:
    """One method at one shape: time (ms), extra peak memory (MiB), or why it is missing."""

    ms: float | None = None
    mib: float | None = None
    fwd_ms: float | None = None
    loss: float | None = None
    note: str = ""


@dataclass
class Row:
    estimator: str
    n: int
    hw: int
    d: int
    cells: dict[str, Cell] = field(default_factory=dict)


# ==== measurement ====


def make_inputs(
    n: int, hw: int, d: int, dtype: torch.dtype, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf inputs whose scores are ~N(0, 1); local is (N, D, H, W) with H = W = sqrt(HW)."""
    side = math.isqrt(hw)
    assert side * side == hw, f"HW must be a square, got {hw}"
    scale = d**-0.25
    local = torch.randn(n, d, side, side, device=device, dtype=dtype) * scale
    if channels_last:
        local = local.contiguous(memory_format=torch.channels_last)
    global_ = torch.randn(n, d, device=device, dtype=dtype) * scale
    return local.requires_grad_(), global_.requires_grad_()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(fn: Fn, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """One forward + backward pass; returns the loss (not synchronised)."""
    local.grad = None
    global_.grad = None
    loss, _ = fn(local, global_)
    loss.backward()
    return loss.detach()


def timed(run: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Mean wall time in ms of `reps` calls of `run` (CUDA events on the GPU)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps
    begin = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - begin) * 1e3 / reps


def measure(
    fn: Fn, local: torch.Tensor, global_: torch.Tensor, device: torch.device, with_fwd: bool
) -> Cell:
    """Warm up (compiles), then time forward + backward, and measure extra peak memory."""
    cell = Cell()
    cell.loss = float(step(fn, local, global_))  # warm-up: Triton / Inductor compile here
    sync(device)
    probe = timed(lambda: step(fn, local, global_), device, 1)
    reps = max(1, min(5, int(200.0 / max(probe, 1e-3))))
    cell.ms = timed(lambda: step(fn, local, global_), device, reps)

    if with_fwd:
        with torch.no_grad():
            cell.fwd_ms = timed(lambda: fn(local, global_), device, reps)

    if device.type == "cuda":
        local.grad = None
        global_.grad = None
        gc.collect()
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(fn, local, global_)
        sync(device)
        cell.mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    local.grad = None
    global_.grad = None
    return cell


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return (
        isinstance(err, torch.cuda.OutOfMemoryError)
        or "out of memory" in text
        or "alloc_failed" in text
    )


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_bytes(n: int, hw: int, d: int) -> int:
    """Rough upper bound of the reference path's memory: a few float32 score-sized tensors."""
    return 8 * n * n * hw * 4 + 4 * n * d * hw * 4


def gradient_check(estimators: list[str], dtype: torch.dtype, device: torch.device) -> None:
    """Fused vs reference at one small shape: relative errors of loss and both gradients."""
    print("### Fused vs reference (N=64, HW=64, D=256)\n")
    print("| est | loss rel. err | d local rel. err | d global rel. err |")
    print("|---|---|---|---|")
    for est in estimators:
        try:
            results = []
            for kernel in ("reference", "fused"):
                torch.manual_seed(0)
                local, global_ = make_inputs(64, 64, 256, dtype, device, channels_last=False)
                loss, _ = local_mi(local, global_, est, kernel=kernel)
                loss.backward()
                assert local.grad is not None and global_.grad is not None, "leaf inputs"
                results.append((loss.detach().double(), local.grad.double(), global_.grad.double()))
            errs = [
                ((f - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                for r, f in zip(*results, strict=True)
            ]
            print(f"| {est} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
        except Exception as err:  # report and carry on
            print(f"| {est} | error: {type(err).__name__}: {str(err)[:80]} | | |")
    print()
    sys.stdout.flush()


# ==== device peaks ====


def device_peak(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    """Dense peak TFLOP/s of the GEMMs the fused path issues for this dtype, if known."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in PEAKS.items():
        if key in name:
            if dtype != torch.float32:
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


# ==== report ====


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def fmt_x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def cell_text(cell: Cell | None, attr: str, spec: str) -> str:
    if cell is None:
        return "not run"
    if cell.note:
        return cell.note
    return fmt(getattr(cell, attr), spec)


def print_reference_table(rows: list[Row]) -> None:
    """The CPU table: reference timings only."""
    print("| est | N | HW | D | reference ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        ref = row.cells.get("reference")
        print(f"| {row.estimator} | {row.n} | {row.hw} | {row.d} | {cell_text(ref, 'ms', '.2f')} |")


def print_table(rows: list[Row], peak: float | None) -> None:
    head = (
        "| est | N | HW | D | ref ms | compiled ms | fused ms "
        "| fused speed-up vs ref / vs compiled | ref MiB | compiled MiB | fused MiB "
        "| memory ref/fused | fused fwd TFLOP/s | % of peak | loss rel. diff |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        ref, comp, fused = (row.cells.get(m) for m in METHODS)
        ok = [c if c is not None and not c.note else None for c in (ref, comp, fused)]
        ref_ok, comp_ok, fused_ok = ok
        speed_ref = ratio(ref_ok.ms if ref_ok else None, fused_ok.ms if fused_ok else None)
        speed_comp = ratio(comp_ok.ms if comp_ok else None, fused_ok.ms if fused_ok else None)
        mem = ratio(ref_ok.mib if ref_ok else None, fused_ok.mib if fused_ok else None)
        tflops = None
        if fused_ok and fused_ok.fwd_ms:
            tflops = 2.0 * row.n * row.n * row.hw * row.d / (fused_ok.fwd_ms * 1e-3) / 1e12
        share = ratio(tflops, peak)
        diff = None
        if ref_ok and fused_ok and ref_ok.loss is not None and fused_ok.loss is not None:
            diff = abs(fused_ok.loss - ref_ok.loss) / max(abs(ref_ok.loss), 1e-12)
        cols = [
            row.estimator,
            str(row.n),
            str(row.hw),
            str(row.d),
            cell_text(ref, "ms", ".2f"),
            cell_text(comp, "ms", ".2f"),
            cell_text(fused, "ms", ".2f"),
            f"{fmt_x(speed_ref)} / {fmt_x(speed_comp)}",
            cell_text(ref, "mib", ".0f"),
            cell_text(comp, "mib", ".0f"),
            cell_text(fused, "mib", ".0f"),
            fmt_x(mem),
            fmt(tflops, ".1f"),
            fmt(None if share is None else 100 * share, ".0f"),
            fmt(diff, ".1e"),
        ]
        print("| " + " | ".join(cols) + " |")


def print_targets(rows: list[Row], peak: float | None) -> None:
    """PASS / FAIL per target, over the rows where it applies and both sides were measured."""
    print("\n### Targets")
    big = [r for r in rows if r.n >= 1024 and r.hw >= 64]

    speed: list[tuple[Row, float]] = []
    memory: list[tuple[Row, float]] = []
    for r in big:
        f, ref = r.cells.get("fused"), r.cells.get("reference")
        if f is None or ref is None or f.note or ref.note:
            continue
        if f.ms and ref.ms:
            speed.append((r, ref.ms / f.ms))
        if f.mib and ref.mib:
            memory.append((r, ref.mib / f.mib))
    for label, pairs, goal in (
        (
            f"fused >= {TARGET_SPEEDUP:g}x faster than reference (N >= 1024, HW >= 64)",
            speed,
            TARGET_SPEEDUP,
        ),
        (
            f"fused >= {TARGET_MEMORY:g}x less peak memory (N >= 1024, HW >= 64)",
            memory,
            TARGET_MEMORY,
        ),
    ):
        if not pairs:
            print(f"- {label}: n/a (not measured)")
            continue
        worst_row, worst = min(pairs, key=lambda p: p[1])
        met = sum(v >= goal for _, v in pairs)
        verdict = "PASS" if met == len(pairs) else "FAIL"
        print(
            f"- {label}: {verdict} ({met}/{len(pairs)} rows; worst {worst:.2f}x at "
            f"{worst_row.estimator} N={worst_row.n} HW={worst_row.hw} D={worst_row.d})"
        )

    measured = [r for r in rows if (f := r.cells.get("fused")) and f.fwd_ms]
    if not measured or peak is None:
        print(
            f"- score GEMM >= {TARGET_PEAK_SHARE:.0%} of dense peak: n/a (no fused timing or peak)"
        )
        return
    largest = max(r.n * r.n * r.hw * r.d for r in measured)
    for r in (r for r in measured if r.n * r.n * r.hw * r.d == largest):
        f = r.cells["fused"]
        assert f.fwd_ms is not None, "filtered above"
        tflops = 2.0 * r.n * r.n * r.hw * r.d / (f.fwd_ms * 1e-3) / 1e12
        verdict = "PASS" if tflops >= TARGET_PEAK_SHARE * peak else "FAIL"
        print(
            f"- score GEMM >= {TARGET_PEAK_SHARE:.0%} of dense peak at the largest shape "
            f"({r.estimator} N={r.n} HW={r.hw} D={r.d}): {verdict} "
            f"({tflops:.0f} of {peak:.0f} TFLOP/s, {100 * tflops / peak:.0f}%)"
        )


# ==== main ====


def make_fn(kernel: str, compile: bool = False) -> Callable[[str], Fn]:
    """estimator -> (local, global_) -> (loss, estimate) through `local_mi(kernel=...)`.

    Compiled functions are built once per estimator with dynamic shapes, so the grid costs
    one Inductor compilation per estimator rather than one per shape.
    """
    built: dict[str, Fn] = {}

    def for_estimator(estimator: str) -> Fn:
        if estimator not in built:

            def fn(local: torch.Tensor, global_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return local_mi(local, global_, estimator, kernel=kernel)

            built[estimator] = torch.compile(fn, dynamic=True) if compile else fn
        return built[estimator]

    return for_estimator


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of the grid")
    parser.add_argument(
        "--estimators",
        nargs="+",
        choices=ESTIMATORS,
        default=list(ESTIMATORS),
        help="estimators to run (default: all)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="input dtype of the local and global features (default: bfloat16)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense peak TFLOP/s to compare against (default: looked up from the device name)",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 for float32 matmuls (reference and fused); default: torch's setting",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="give the local map in channels-last memory (the fused path then needs no copy)",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile(reference) column"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=240.0,
        help="seconds after which remaining cells are skipped (default: 240)",
    )
    return parser.parse_args(argv)


def grid(cuda: bool, quick: bool) -> list[tuple[int, int, int]]:
    """(N, HW, D) shapes, smallest first."""
    if not cuda:
        ns, hws, ds = ([16, 64], [16, 64], [64, 256]) if not quick else ([16], [16], [64])
    elif quick:
        ns, hws, ds = [256, 1024], [64], [256, 2048]
    else:
        ns, hws, ds = [64, 256, 1024, 2048], [64, 256], [256, 2048]
    shapes = [(n, hw, d) for n in ns for hw in hws for d in ds]
    return sorted(shapes, key=lambda s: (s[0] * s[0] * s[1] * s[2], s))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    deadline = time.monotonic() + args.time_budget
    peak = device_peak(device, dtype, args.peak_tflops)

    # ==== header ====
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "CPU"
    print("## local-MI benchmark\n")
    print(f"- device: {name}; torch {torch.__version__}; python {platform.python_version()}")
    print(f"- dtype of the features: {dtype}")
    try:
        import triton

        print(f"- triton {triton.__version__}")
    except Exception:  # report, do not fail
        print("- triton: not importable (fused path unavailable)")
    if not cuda:
        print(
            "- No CUDA device: timing the reference path only, on the CPU, at small shapes. "
            "The fused path (Triton) and the targets need a GPU."
        )
    if cuda:
        print(
            f"- dense peak used for '% of peak': {fmt(peak, '.0f')} TFLOP/s"
            + ("" if peak is not None else " (unknown device: pass --peak-tflops)")
        )
        print(
            "- time: one forward + backward pass, mean over up to 5 runs after a warm-up run; "
            "memory: peak allocated during that pass minus what was allocated before it (the "
            "inputs), so it includes the input gradients; fused fwd TFLOP/s: 2*N*N*HW*D / "
            "forward time."
        )
    else:
        print("- time: one forward + backward pass, mean over up to 5 runs after a warm-up run")
    print(
        f"- targets (N >= 1024, HW >= 64): fused >= {TARGET_SPEEDUP:g}x faster than the "
        f"reference, >= {TARGET_MEMORY:g}x less peak memory; score GEMM >= "
        f"{TARGET_PEAK_SHARE:.0%} of the dense peak at the largest shape\n"
    )
    sys.stdout.flush()

    # ==== functions under test ====
    methods: dict[str, Callable[[str], Fn]] = {"reference": make_fn("reference")}
    if cuda:
        if not args.no_compile:
            methods["compiled"] = make_fn("reference", compile=True)
        methods["fused"] = make_fn("fused")

    if cuda:
        gradient_check(args.estimators, dtype, device)
    shapes = grid(cuda, args.quick)
    rows = {(e, s): Row(e, *s) for e in args.estimators for s in shapes}

    # Fused and reference over the whole grid first; the compiled column (slow to build) last,
    # so a tight time budget cuts it rather than the comparison the targets are about.
    order = [m for m in ("fused", "reference", "compiled") if m in methods]
    errors: list[str] = []
    broken: set[str] = set()  # fused / compiled methods that failed to build or run
    for method in order:
        for est in args.estimators:
            for n, hw, d in shapes:
                row = rows[(est, (n, hw, d))]
                if time.monotonic() > deadline:
                    row.cells[method] = Cell(note="skipped (time)")
                    continue
                if method in broken:
                    row.cells[method] = Cell(note="skipped (error)")
                    continue
                label = f"{method:9s} {est} N={n} HW={hw} D={d}"
                print(f"  running {label} ...", file=sys.stderr, flush=True)
                local = global_ = None
                try:
                    if method != "fused" and cuda:
                        free = torch.cuda.mem_get_info(device)[0]
                        if reference_bytes(n, hw, d) > 0.9 * free:
                            row.cells[method] = Cell(note="skipped (OOM risk)")
                            continue
                    local, global_ = make_inputs(n, hw, d, dtype, device, args.channels_last)
                    fn = methods[method](est)
                    row.cells[method] = measure(fn, local, global_, device, method == "fused")
                except Exception as err:  # one bad cell must not end the run
                    if is_oom(err):
                        row.cells[method] = Cell(note="OOM")
                    else:
                        text = str(err).strip()
                        first = text.splitlines()[0][:200] if text else ""
                        row.cells[method] = Cell(note=f"error: {type(err).__name__}")
                        errors.append(f"- {label}: {type(err).__name__}: {first}")
                        print(errors[-1], file=sys.stderr)
                        if method != "reference":  # a build failure repeats at every shape
                            broken.add(method)
                finally:
                    del local, global_
                    free_memory(device)

    if cuda:
        print_table(list(rows.values()), peak)
        print_targets(list(rows.values()), peak)
    else:
        print_reference_table(list(rows.values()))
    if errors:
        print("\n### Errors (after one, the fused / compiled column skips its other cells)\n")
        print("\n".join(errors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
