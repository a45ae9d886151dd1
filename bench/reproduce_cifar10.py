"""Reproduce the paper's CIFAR-10 table: DIM(L) with JSD, NCE and DV, probed on conv, fc and y.

Each estimator trains a conv32 DIM(L) encoder on the train split through `dimcli.train.train`
(the real data path: JPEG folder, loader, step, run folder); the encoder file is then encoded
with `dimcli.encode.encode_folder` on a training subset and the test split, and the frozen
features are probed by `dimcli.probe` (linear, kNN, the paper's MLP). The same
encoder at its random initialisation (same seed, so the trained runs' starting point) is the
baseline row.

    .venv/bin/python bench/reproduce_cifar10.py --budget cpu --results /tmp/c10.json
    .venv/bin/python bench/reproduce_cifar10.py --budget paper --device cuda --results r.json
    .venv/bin/python bench/reproduce_cifar10.py --smoke --data DIR   # seconds; checks the path

Budgets (any field can be overridden by its option):

- cpu: mi_units 512, batch 64, 3000 steps (about 4 epochs) per estimator; probes trained on
  500 images per class (5k) and scored on the full 10k test split; linear probe L2 grid
  1e-4/1e-3/1e-2 with 50 L-BFGS iterations; MLP probe 10 epochs. On 2 idle cores this is
  about 30 minutes of training and 10 of probing; a loaded machine needs --max-steps lower.
  `--probe-train-per-class 0` probes on the whole 50k train split: about ten times the probe
  time (several minutes per model on the 4096-wide conv layer).
- paper: mi_units 2048, batch 64, 1000 epochs, Adam 1e-4 (0.5, 0.999); probes on the full
  50k / 10k splits; MLP probe 50 epochs. For a GPU.

Every finished piece (a trained run, one model x layer of probes) goes into --results as it
completes; running the same command again skips what is there and resumes an interrupted
training run from its checkpoint. The markdown tables are printed at the end (and with
--report-only, from the JSON alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cifar_folder, machine, machine_line, markdown_table, subset_folder

from dimcli.data import PAPER_MEAN, PAPER_STD
from dimcli.encode import encode_folder
from dimcli.features import read_features
from dimcli.modelfile import save_encoder
from dimcli.models import build_encoder
from dimcli.probe import DEFAULT_L2_GRID, knn_probe, labels_from_keys, linear_probe, mlp_probe
from dimcli.settings import TrainSettings
from dimcli.train import MODEL_FILE, RESIZE_POLICY, train

ESTIMATORS = ("jsd", "nce", "dv")
LAYERS = ("conv", "fc", "y")
PROBES = ("linear", "knn", "mlp")
MODELS = ("random", *ESTIMATORS)
ROW_NAMES = {"random": "random init", "jsd": "DIM(L) JSD", "nce": "DIM(L) NCE", "dv": "DIM(L) DV"}

# The paper's CIFAR-10 numbers (Hjelm et al. 2019, Table 1 and the linear-SVM line), %.
# It reports no DV row and no kNN probe; its linear probe is an SVM for "DIM(L)".
PAPER: dict[str, dict[str, tuple[float, float, float] | None]] = {
    "mlp": {"jsd": (73.25, 73.62, 66.96), "nce": (75.21, 75.57, 69.13)},
    "linear": {"jsd": (63.25, 54.06, 49.62)},
}


@dataclass(frozen=True)
class Budget:
    mi_units: int
    batch_size: int
    epochs: int | None
    max_steps: int | None
    probe_train_per_class: int | None  # None = the whole train split
    mlp_epochs: int
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID  # the linear probe's L2 candidates
    linear_max_iter: int = 100


# The cpu budget trims the probes: on a 4096-wide conv layer the default linear probe (7 L-BFGS
# fits of 100 iterations) and a 30-epoch MLP take many minutes per model on 2 cores.
BUDGETS = {
    "cpu": Budget(512, 64, None, 3000, 500, 10, (1e-4, 1e-3, 1e-2), 50),
    "paper": Budget(2048, 64, 1000, None, None, 50),
    "smoke": Budget(64, 16, None, 3, 10, 2, (1e-3,), 20),
}


# ==== results file ====


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}, "probes": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


# ==== training ====


def train_estimator(
    estimator: str, args: argparse.Namespace, budget: Budget, train_dir: Path
) -> dict[str, Any]:
    """Train (or resume) one DIM(L) run; returns what the results file keeps about it."""
    out = args.work / "runs" / estimator
    resume = str(out) if (out / "checkpoint").is_dir() else None
    settings = TrainSettings(
        images=train_dir,
        encoder="conv32",
        preset="dim-l",
        estimator=estimator,  # type: ignore[arg-type]  # checked by parse_args
        mi_units=budget.mi_units,
        batch_size=budget.batch_size,
        epochs=budget.epochs,
        max_steps=budget.max_steps,
        lr=1e-4,
        beta1=0.5,
        beta2=0.999,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        out=out,
        resume=resume,
        log_every=args.log_every,
        save_every=args.save_every,
    )
    result = train(settings, console=Console(highlight=False), verbosity=-1 if args.quiet else 0)
    if result.interrupted is not None:
        sys.exit(
            f"training {estimator} interrupted by signal {result.interrupted}; rerun to resume"
        )
    return {
        "run_dir": str(result.run_dir),
        "model": str(result.model_path),
        "steps": result.steps,
        "epochs": result.epochs,
        "seconds": result.seconds,
        "images_per_s": result.images_per_s,
        "final": result.final,
        "settings": {
            "mi_units": budget.mi_units,
            "batch_size": budget.batch_size,
            "epochs": budget.epochs,
            "max_steps": budget.max_steps,
        },
    }


def random_init_model(args: argparse.Namespace) -> Path:
    """The encoder as `train` builds it before its first step (same seed), saved as a file."""
    path = args.work / "random-init" / MODEL_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)  # train() seeds, then builds the encoder first
        encoder = build_encoder("conv32", image_size=32, feature_dim=64)
        preprocessing = {
            "image_size": 32,
            "mean": list(PAPER_MEAN),
            "std": list(PAPER_STD),
            "resize": RESIZE_POLICY,
        }
        save_encoder(encoder, path, preprocessing=preprocessing, training={"steps": 0})
    return path


# ==== evaluation ====


def probe_model(
    name: str,
    model: Path,
    layer: str,
    args: argparse.Namespace,
    budget: Budget,
    train_dir: Path,
    test_dir: Path,
) -> dict[str, Any]:
    """Encode the probe splits with `model` at `layer` and run the probes on them."""
    feats = args.work / "features" / name
    feats.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    common: dict[str, Any] = {
        "model": model,
        "layer": layer,
        "batch_size": 256,
        "workers": args.workers,
        "device": args.device,
        "progress": False,
        "overwrite": True,
    }
    enc_train = encode_folder(train_dir, feats / f"train-{layer}.npy", **common)
    enc_test = encode_folder(test_dir, feats / f"test-{layer}.npy", **common)
    encode_s = time.perf_counter() - t0

    x_train, k_train = read_features(enc_train.out)
    x_test, k_test = read_features(enc_test.out)
    t1 = time.perf_counter()
    # Labels are the class folders; the class order is the sorted folder names (CIFAR's own).
    train_labels, test_labels = labels_from_keys(k_train), labels_from_keys(k_test)
    classes = sorted(set(train_labels.values()))
    y_train = np.array([classes.index(train_labels[k]) for k in k_train])
    y_test = np.array([classes.index(test_labels[k]) for k in k_test])
    data = (np.asarray(x_train), y_train, np.asarray(x_test), y_test, len(classes), args.seed)
    top1: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for method in args.probes:
        t1 = time.perf_counter()
        if method == "linear":
            res = linear_probe(*data, l2_grid=budget.l2_grid, max_iter=budget.linear_max_iter)
        elif method == "knn":
            res = knn_probe(*data)
        else:
            res = mlp_probe(*data, epochs=budget.mlp_epochs)
        top1[method] = 100.0 * res.top1
        seconds[method] = time.perf_counter() - t1
    return {
        "layer": layer,
        "dim": int(x_train.shape[1]),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "top1": top1,
        "probe_seconds": seconds,
        "encode_s": encode_s,
        "probe_s": sum(seconds.values()),
        "encode_images_per_s": (enc_train.n_rows + enc_test.n_rows) / max(encode_s, 1e-9),
    }


# ==== tables ====


def tables(results: dict[str, Any]) -> str:
    """The measured table and the paper's, in the same layout (rows models, conv/fc/y per probe)."""
    probes = [p for p in PROBES if any(p in v["top1"] for v in results["probes"].values())]
    headers = ["model"] + [f"{p} {layer}" for p in probes for layer in LAYERS]
    measured = []
    for model in MODELS:
        row: list[Any] = [ROW_NAMES[model]]
        for p in probes:
            for layer in LAYERS:
                entry = results["probes"].get(f"{model}/{layer}")
                row.append(entry["top1"].get(p) if entry else None)
        if any(v is not None for v in row[1:]):
            measured.append(row)
    paper = []
    for model in ESTIMATORS:
        row = [ROW_NAMES[model]]
        for p in probes:
            numbers = PAPER.get(p, {}).get(model)
            row += list(numbers) if numbers else [None] * len(LAYERS)
        paper.append(row)

    runs = results["runs"]
    train_rows = [
        [ROW_NAMES[m], r["steps"], r["epochs"], round(r["images_per_s"], 1), round(r["seconds"])]
        for m, r in runs.items()
    ]
    parts = [
        "Test accuracy, % (top-1):",
        "",
        markdown_table(headers, measured),
        "",
        "The paper's numbers in the same layout (- = not reported; its linear probe is an SVM):",
        "",
        markdown_table(headers, paper, digits=2),
    ]
    if train_rows:
        parts += [
            "",
            "Training runs:",
            "",
            markdown_table(["model", "steps", "epochs", "images/s", "seconds"], train_rows),
        ]
    meta = results.get("meta")
    if meta:
        parts += ["", f"Budget: {meta['budget']}; {meta['machine_line']}"]
    return "\n".join(parts)


# ==== main ====


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, help="CIFAR-10 folder with train/ and test/")
    ap.add_argument("--budget", choices=("cpu", "paper"), default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: checks the path only")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--probes", default=",".join(PROBES))
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--max-steps", type=int, help="override the budget's steps per estimator")
    ap.add_argument("--epochs", type=int, help="override the budget's epochs per estimator")
    ap.add_argument("--mi-units", type=int)
    ap.add_argument("--probe-train-per-class", type=int, help="0 = the whole train split")
    ap.add_argument("--mlp-epochs", type=int)
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default: auto)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dimcli-repro"), help="runs, features")
    ap.add_argument("--results", type=Path, default=Path("/tmp/dimcli-repro/results.json"))
    ap.add_argument("--report-only", action="store_true", help="print the tables from --results")
    ap.add_argument("--quiet", action="store_true", help="no per-interval training lines")
    args = ap.parse_args(argv)
    args.estimators = [e for e in args.estimators.split(",") if e]
    args.probes = [p for p in args.probes.split(",") if p]
    args.layers = [layer for layer in args.layers.split(",") if layer]
    bad = (
        set(args.estimators) - set(ESTIMATORS)
        | set(args.probes) - set(PROBES)
        | set(args.layers) - set(LAYERS)
    )
    if bad:
        ap.error(f"unknown estimator/probe/layer {sorted(bad)}")
    return args


def resolve_budget(args: argparse.Namespace) -> Budget:
    b = BUDGETS["smoke" if args.smoke else args.budget]
    max_steps, epochs = b.max_steps, b.epochs
    if args.max_steps is not None or args.epochs is not None:
        max_steps, epochs = args.max_steps, args.epochs
    per_class = b.probe_train_per_class
    if args.probe_train_per_class is not None:
        per_class = args.probe_train_per_class or None
    return dataclasses.replace(
        b,
        mi_units=args.mi_units or b.mi_units,
        epochs=epochs,
        max_steps=max_steps,
        probe_train_per_class=per_class,
        mlp_epochs=args.mlp_epochs or b.mlp_epochs,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = load_results(args.results)
    if args.report_only:
        print(tables(results))
        return 0

    budget = resolve_budget(args)
    root = cifar_folder(args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = root / "train", root / "test"
    # Limitation: the cpu budget probes on 500 training images per class, to keep the probes
    # to minutes on a CPU; see docs/benchmarks.md
    probe_train = subset_folder(
        train_dir,
        args.work / f"probe-train-{budget.probe_train_per_class}",
        budget.probe_train_per_class,
    )
    info = machine()
    results["meta"] = {
        "budget": ("smoke" if args.smoke else args.budget)
        + f" (mi_units {budget.mi_units}, batch {budget.batch_size}, epochs {budget.epochs},"
        f" max_steps {budget.max_steps}, probe train per class"
        f" {budget.probe_train_per_class or 'all'}, MLP probe epochs {budget.mlp_epochs},"
        f" linear L2 grid {list(budget.l2_grid)}, {budget.linear_max_iter} iterations)",
        "machine": info,
        "machine_line": machine_line(info),
        "command": " ".join(sys.argv),
    }
    save_results(args.results, results)
    started = time.perf_counter()

    for name in ["random", *args.estimators]:
        # ---- the encoder: random init, or a trained run (resumed when cut short) ----
        if name == "random":
            model = random_init_model(args)
        else:
            if name not in results["runs"]:
                print(
                    f"== training DIM(L) {name} ({time.perf_counter() - started:.0f} s)", flush=True
                )
                results["runs"][name] = train_estimator(name, args, budget, train_dir)
                save_results(args.results, results)
            model = Path(results["runs"][name]["model"])

        # ---- probes, one layer at a time so that a partial run keeps what it has ----
        for layer in args.layers:
            key = f"{name}/{layer}"
            if key in results["probes"]:
                continue
            print(f"== probing {name} {layer} ({time.perf_counter() - started:.0f} s)", flush=True)
            entry = probe_model(name, model, layer, args, budget, probe_train, test_dir)
            results["probes"][key] = entry
            save_results(args.results, results)
            accs = ", ".join(f"{p} {v:.1f}" for p, v in entry["top1"].items())
            print(
                f"   {name} {layer}: {accs} (encode {entry['encode_s']:.0f} s,"
                f" probes {entry['probe_s']:.0f} s)",
                flush=True,
            )

    print()
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
