"""Soak test: a long `dim train` on a folder with ~1% bad files, stopped by SIGTERM and resumed.

The folder is a CIFAR-10 training subset plus planted bad files (truncated JPEGs, zero-byte
files, text saved as .jpg), about `--bad-fraction` of it. `python -m dimcli train` runs in a
child process; after a random interval it gets SIGTERM, must exit cleanly (saving at the
current step), and is started again with `--resume`, `--cycles` times. After every cycle:

- the checkpoint loads (`dimcli.checkpoint.load_checkpoint`) and the model file loads
  (`dimcli.modelfile.load_encoder`);
- the checkpoint's step never goes back, and equals the step in the model file's metadata.

A clean stop exits with 128 + SIGTERM (143), as `dim train` documents for interruptions.
A last resume then trains exactly `--final-steps` more steps and must stop at
checkpoint step + final steps, with metrics.jsonl steps strictly increasing (lines written
after a checkpoint and lost with the stop are dropped on resume, never duplicated).
skipped.txt must list planted bad files only.

    .venv/bin/python bench/soak.py --cycles 5 --duration 300
    .venv/bin/python bench/soak.py --smoke --data DIR       # 2 short cycles on a tiny folder

Exits non-zero if any check fails; prints a markdown table of the cycles and a summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cifar_folder, machine_line, markdown_table

from dimcli.checkpoint import load_checkpoint
from dimcli.modelfile import load_encoder, read_metadata
from dimcli.train import METRICS_FILE, MODEL_FILE

# ==== the folder ====


def make_folder(src: Path, dst: Path, n_images: int, bad_fraction: float, seed: int) -> list[str]:
    """Copy `n_images` of `src` (round-robin over classes) into `dst` and plant bad files.

    Returns:
        The relative keys ("<class>/<name>") of the planted bad files.
    """
    rng = random.Random(seed)
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.jpg")) for c in classes]
    good: list[Path] = []
    for i in range(n_images):
        c = i % len(classes)
        source = files[c][i // len(classes)]
        target = dst / classes[c].name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        good.append(target)

    n_bad = max(3, round(n_images * bad_fraction))
    bad: list[str] = []
    for j in range(n_bad):
        cls = classes[j % len(classes)].name
        target = dst / cls / f"bad-{j:04d}.jpg"
        kind = j % 3
        if kind == 0:  # a real JPEG cut short
            raw = rng.choice(good).read_bytes()
            target.write_bytes(raw[: len(raw) // 3])
        elif kind == 1:  # zero bytes
            target.write_bytes(b"")
        else:  # text with an image name
            target.write_text("this is not an image\n" * 4)
        bad.append(f"{cls}/{target.name}")
    return bad


# ==== checks ====


def check_run(run: Path, previous_step: int) -> tuple[int | None, list[str]]:
    """Load the checkpoint and model file; returns (checkpoint step, problems)."""
    problems: list[str] = []
    try:
        ckpt = load_checkpoint(run)
    except Exception as err:  # any failure to load is what the soak looks for
        return None, [f"checkpoint does not load: {err}"]
    if ckpt is None:
        return None, ["no checkpoint"]
    step = int(ckpt.state["progress"]["step"])
    if step < previous_step:
        problems.append(f"checkpoint step went back from {previous_step} to {step}")
    try:
        load_encoder(run / MODEL_FILE)
        model_step = int(read_metadata(run / MODEL_FILE)["training"]["steps"])
        if model_step != step:
            problems.append(f"model file at step {model_step}, checkpoint at {step}")
    except Exception as err:
        problems.append(f"model file does not load: {err}")
    return step, problems


def metric_steps(run: Path) -> list[int]:
    path = run / METRICS_FILE
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "step":
            steps.append(int(rec["step"]))
    return steps


def read_skipped(run: Path) -> list[str]:
    path = run / "skipped.txt"
    if not path.is_file():
        return []
    return [line.split("\t", 1)[0] for line in path.read_text().splitlines() if line.strip()]


# ==== the child ====


def train_command(args: argparse.Namespace, images: Path, run: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dimcli", "train"]
    if resume:
        return [*cmd, "--resume", str(run), "--max-steps", str(args.max_steps)]
    return [
        *cmd,
        str(images),
        "--out",
        str(run),
        "--mi-units",
        str(args.mi_units),
        "--batch-size",
        str(args.batch_size),
        "--max-steps",
        str(args.max_steps),
        "--save-every",
        str(args.save_every),
        "--log-every",
        str(args.log_every),
        "--seed",
        str(args.seed),
        "--device",
        "cpu",
    ]


def run_cycle(cmd: list[str], seconds: float, log: Path) -> tuple[int, float, bool]:
    """Start `cmd`, SIGTERM it after `seconds` (unless it ends first); (exit code, s, signalled)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        start = time.perf_counter()
        signalled = False
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            signalled = True
            try:
                proc.wait(timeout=120)  # saving a checkpoint takes seconds, not minutes
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return -9, time.perf_counter() - start, signalled
        return proc.returncode, time.perf_counter() - start, signalled


# ==== main ====


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, help="CIFAR-10 folder with train/ (default: the archive)")
    ap.add_argument("--cycles", type=int, default=5, help="SIGTERM/resume cycles")
    ap.add_argument("--duration", type=float, default=300, help="seconds of training in all")
    ap.add_argument("--images", type=int, default=2000, help="good images in the folder")
    ap.add_argument("--bad-fraction", type=float, default=0.01)
    ap.add_argument("--mi-units", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=1_000_000, help="the long run's limit")
    ap.add_argument("--final-steps", type=int, default=3, help="steps of the last resume")
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="keep the folder and run here (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="2 cycles, 100 images, batch 8")
    args = ap.parse_args(argv)
    if args.smoke:
        args.cycles, args.duration, args.images = 2, 40.0, 100
        args.batch_size, args.mi_units, args.final_steps = 8, 64, 2
    rng = random.Random(args.seed)

    root = cifar_folder(args.data)
    work = args.work or Path(tempfile.mkdtemp(prefix="dimcli-soak-"))
    shutil.rmtree(work / "images", ignore_errors=True)
    shutil.rmtree(work / "run", ignore_errors=True)
    images, run = work / "images", work / "run"
    planted = make_folder(root / "train", images, args.images, args.bad_fraction, args.seed)
    print(f"folder {images}: {args.images} images + {len(planted)} bad files", flush=True)

    rows: list[list[Any]] = []
    failures: list[str] = []
    step, restarts, total_s = 0, 0, 0.0
    mean_interval = args.duration / args.cycles
    for cycle in range(1, args.cycles + 1):
        # ---- train until SIGTERM, then check what it left ----
        interval = rng.uniform(0.5, 1.5) * mean_interval
        resume = (run / "config.json").is_file()
        code, seconds, signalled = run_cycle(
            train_command(args, images, run, resume), interval, work / f"cycle-{cycle}.log"
        )
        total_s += seconds
        before = step
        new_step, problems = check_run(run, step)
        # `dim train` stops cleanly on SIGTERM with exit code 128 + 15, like a shell.
        expected = 128 + signal.SIGTERM if signalled else 0
        if code != expected:
            problems.append(f"exit code {code}, expected {expected}")
        step = new_step if new_step is not None else step
        restarts += int(resume and code == expected and step >= before)
        failures += [f"cycle {cycle}: {p}" for p in problems]
        rows.append(
            [
                cycle,
                "resume" if resume else "new",
                f"{interval:.0f}",
                "SIGTERM" if signalled else "ended",
                code,
                before,
                step,
                len(read_skipped(run)),
                "; ".join(problems) or "ok",
            ]
        )
        print(
            f"cycle {cycle}: exit {code} after {seconds:.0f} s, step {before} -> {step}, "
            f"{'; '.join(problems) or 'ok'}",
            flush=True,
        )

    # ---- the last resume: exactly final_steps more, then consistency ----
    target = step + args.final_steps
    cmd = train_command(args, images, run, resume=True)
    cmd[cmd.index("--max-steps") + 1] = str(target)
    code, seconds, _ = run_cycle(cmd, 600, work / "final.log")
    final_step, problems = check_run(run, step)
    if code != 0:
        problems.append(f"final resume exit code {code}")
    if final_step != target:
        problems.append(f"final step {final_step}, expected {target}")
    steps = metric_steps(run)
    if any(b <= a for a, b in itertools.pairwise(steps)):
        problems.append("metrics.jsonl steps are not strictly increasing")
    skipped = read_skipped(run)
    unexpected = sorted(set(skipped) - set(planted))
    if unexpected:
        problems.append(f"skipped.txt lists good files: {unexpected[:3]}")
    failures += [f"final: {p}" for p in problems]
    rows.append(
        [
            "final",
            "resume",
            "-",
            "ended",
            code,
            step,
            final_step,
            len(skipped),
            "; ".join(problems) or "ok",
        ]
    )

    print()
    print(
        markdown_table(
            [
                "cycle",
                "start",
                "interval s",
                "stop",
                "exit",
                "step before",
                "step after",
                "skipped",
                "checks",
            ],
            rows,
        )
    )
    print()
    print(
        f"Summary: {final_step} steps in {total_s + seconds:.0f} s of training; "
        f"{restarts + int(code == 0)} resumes survived out of {args.cycles}; {len(skipped)} of "
        f"{len(planted)} planted bad files skipped (listed in skipped.txt), "
        f"{len(unexpected)} good files skipped; {len(failures)} failed checks."
    )
    print(machine_line())
    for f in failures:
        print(f"FAIL {f}")
    if args.work is None and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
