"""`dim demo`: the whole workflow on the bundled CIFAR-10 sample, in about three minutes on a CPU.

1. unpack the sample (`dimcli.sample`): 2,000 training and 1,000 test images, 10 classes;
2. train DIM(L) with the JSD estimator on the training images (`dimcli.train`);
3. save the same architecture at its random initialisation (same seed, never trained) as a
   second model file, the baseline that shows what training bought;
4. encode train and test images with both models at the conv and y layers (`dimcli.encode`);
5. fit linear and kNN probes on the training features, score them on the test features,
   labels from the class folders (`dimcli.probe`);
6. write the visual report (`dimcli.report`) and print a trained-versus-random table.

Everything lands in one folder, which is also an ordinary run folder (`dim report`,
`dim encode --model` and `dim probe` work on it):

    encoder.safetensors, config.json, metrics.jsonl, checkpoint/   from training
    random-init.safetensors                                         the untrained baseline
    features/{trained,random}-{conv,y}-{train,test}.npy (+ .index.csv)
    probe.json (trained, conv) and probe-{trained-y,random-conv,random-y}.json
    report.html, figures/*.png
    demo.json                                                       timings and accuracies
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dimcli.errors import UsageError
from dimcli.sample import CLASSES, PER_CLASS, sample_dir, subset_dir

# Chosen so that the full demo takes about three minutes on two otherwise idle CPU cores:
# 15 epochs are 30,000 training images (about 90 s at 300-450 images/s), and the linear
# probes of the two 4096-wide conv layers take most of the rest. A learning rate of 1e-3
# (the paper uses 1e-4 over far longer runs) gave better probes after 15 epochs in our
# measurements. A measured run is in docs/sample.md.
DEMO_EPOCHS = 15
QUICK_EPOCHS = 3
DEMO_MI_UNITS = 512
DEMO_BATCH_SIZE = 64
DEMO_LR = 1e-3
DEMO_LOG_EVERY = 10
MODELS: tuple[str, ...] = ("trained", "random")
DEMO_LAYERS: tuple[str, ...] = ("conv", "y")
PROBES: tuple[str, ...] = ("linear", "knn")
RANDOM_MODEL_FILE = "random-init.safetensors"
SUMMARY_FILE = "demo.json"


@dataclass
class DemoResult:
    """Where the demo put things and what it measured.

    Attributes:
        out: the demo (and run) folder.
        report: the HTML report.
        model: the trained encoder file; random_model: the untrained one.
        features: the folder of feature files.
        accuracy: {"trained/conv": {"linear": top1, "knn": top1}, ...} on the test images.
        seconds: wall time of each phase and "total".
    """

    out: Path
    report: Path
    model: Path
    random_model: Path
    features: Path
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in doc.items()}


def auto_threads(available: int) -> int:
    """Torch threads for the demo: `available` (torch's default) less the cores already busy.

    On a machine where other processes keep the cores busy, multi-threaded kernels wait on
    each other at every barrier: training measured four times slower with 2 threads than
    with 1 on a shared 2-core machine. The one-minute load average says how many cores are
    taken; the demo uses the rest (at least one).
    """
    # Limitation: the load average is a heuristic (Unix only; other platforms get
    # `available`); pass --threads to choose; see docs/limitations.md
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return available
    return max(1, min(available, available - round(busy)))


def default_out(now: datetime | None = None) -> Path:
    """runs/demo-<YYYYmmdd-HHMMSS>, with -2, -3, ... when that name is taken."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    candidate = Path("runs") / f"demo-{stamp}"
    n = 2
    while candidate.exists():
        candidate = Path("runs") / f"demo-{stamp}-{n}"
        n += 1
    return candidate


def run_demo(
    out: Path | None = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    quick: bool = False,
    per_class: int | None = None,
    mi_units: int = DEMO_MI_UNITS,
    batch_size: int | None = None,
    lr: float = DEMO_LR,
    seed: int = 0,
    workers: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Train, encode, probe and report on the bundled sample; see the module docstring.

    Args:
        out: the demo folder (default `default_out()`); must not exist or be empty.
        epochs: training epochs (default DEMO_EPOCHS, or QUICK_EPOCHS with `quick`).
        steps: stop training after this many steps (with or instead of `epochs`).
        quick: a shorter run (QUICK_EPOCHS) for a first look.
        per_class: use only the first N training images and N // 2 test images (at least 2)
            of each class (`dimcli.sample.subset_dir`; tiny runs, tests).
        batch_size: images per step (default DEMO_BATCH_SIZE, or all training images when
            `per_class` leaves fewer).
        mi_units, lr, seed, workers, device: passed to training.
        threads: CPU threads for torch in this process (default: `auto_threads()`, the
            cores other processes leave idle).
        console: where progress and the summary go.

    Raises:
        UsageError: bad numbers, or an `out` folder that is not empty.
        DimError: anything training, encoding or probing reports.
    """
    console = console or Console()
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if per_class is not None and not 2 <= per_class <= PER_CLASS["train"]:
        raise UsageError(
            f"--per-class must be between 2 and {PER_CLASS['train']} (the sample's size), "
            f"got {per_class}"
        )
    out = Path(out) if out is not None else default_out()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"demo folder {out} already exists and is not empty; pass another --out")
    if epochs is None and steps is None:
        epochs = QUICK_EPOCHS if quick else DEMO_EPOCHS

    import torch

    before = torch.get_num_threads()
    threads = threads if threads is not None else auto_threads(before)
    console.print(
        f"[bold]dim demo[/bold]: writing everything to [cyan]{out}[/cyan] "
        f"({threads} CPU thread{'s' if threads > 1 else ''})"
    )
    torch.set_num_threads(threads)
    try:
        return _run(
            out,
            console,
            epochs=epochs,
            steps=steps,
            per_class=per_class,
            mi_units=mi_units,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            workers=workers,
            device=device,
        )
    finally:
        torch.set_num_threads(before)  # a Python caller keeps its own setting


def _run(
    out: Path,
    console: Console,
    *,
    epochs: int | None,
    steps: int | None,
    per_class: int | None,
    mi_units: int,
    batch_size: int | None,
    lr: float,
    seed: int,
    workers: int | None,
    device: str,
) -> DemoResult:
    """The demo's phases, with validated arguments; see `run_demo`."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    # ==== data: the bundled sample, unpacked once into the cache ====
    t0 = time.perf_counter()
    if per_class is None:
        root = sample_dir()
    else:
        root = subset_dir(per_class, min(max(2, per_class // 2), PER_CLASS["test"]))
    train_dir, test_dir = root / "train", root / "test"
    if batch_size is None:
        batch_size = min(DEMO_BATCH_SIZE, len(CLASSES) * (per_class or PER_CLASS["train"]))
    seconds["sample"] = time.perf_counter() - t0
    console.print(f"sample: {train_dir} (train), {test_dir} (test)", highlight=False)

    # ==== train DIM(L), JSD ====
    from dimcli.settings import validate_settings
    from dimcli.train import train

    settings = validate_settings(
        {
            "images": train_dir,
            "out": out,
            "encoder": "conv32",
            "preset": "dim-l",
            "estimator": "jsd",
            "mi_units": mi_units,
            "batch_size": batch_size,
            "lr": lr,
            "epochs": epochs,
            "max_steps": steps,
            "seed": seed,
            "workers": workers,
            "device": device,
            "log_every": DEMO_LOG_EVERY,
        }
    )
    t0 = time.perf_counter()
    result = train(settings, console=console, verbosity=0)
    seconds["train"] = time.perf_counter() - t0
    if result.interrupted is not None or result.model_path is None:
        raise UsageError(
            f"training was interrupted; the partial run is in {out} (dim train --resume {out})"
        )
    model = result.model_path

    # ==== the untrained baseline: same architecture, same seed ====
    random_model = out / RANDOM_MODEL_FILE
    save_random_init(model, random_model, seed=seed)

    # ==== encode train and test with both models at both layers ====
    from dimcli.encode import encode_folder

    t0 = time.perf_counter()
    features = out / "features"
    features.mkdir(exist_ok=True)
    files = {"trained": model, "random": random_model}
    for name in MODELS:
        for layer in DEMO_LAYERS:
            for split, folder in (("train", train_dir), ("test", test_dir)):
                encode_folder(
                    folder,
                    features / f"{name}-{layer}-{split}.npy",
                    model=files[name],
                    layer=layer,
                    workers=0,
                    device=device,
                    progress=False,
                )
    seconds["encode"] = time.perf_counter() - t0
    console.print(f"encoded train and test images with both models into {features}")

    # ==== probes: trained on train features, scored on test features ====
    t0 = time.perf_counter()
    accuracy: dict[str, dict[str, float]] = {}
    for name in MODELS:
        for layer in DEMO_LAYERS:
            doc = probe_pair(features, name, layer, seed=seed)
            target = out / (
                "probe.json"
                if (name, layer) == ("trained", "conv")
                else f"probe-{name}-{layer}.json"
            )
            target.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            accuracy[f"{name}/{layer}"] = {r["method"]: r["top1"] for r in doc["results"]}
    seconds["probe"] = time.perf_counter() - t0

    # ==== report ====
    from dimcli.report import write_report

    t0 = time.perf_counter()
    report = write_report(
        out, images=train_dir, features=features / "trained-conv-train.npy", seed=seed
    )
    seconds["report"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started

    demo = DemoResult(
        out=out,
        report=report,
        model=model,
        random_model=random_model,
        features=features,
        accuracy=accuracy,
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    (out / SUMMARY_FILE).write_text(json.dumps(demo.to_dict(), indent=2) + "\n", encoding="utf-8")
    print_summary(console, demo, steps=result.steps, epochs=result.epochs)
    return demo


def save_random_init(trained: Path, out: Path, *, seed: int) -> None:
    """Save the trained model's architecture at its seeded random initialisation, untrained.

    Training seeds torch with the run's seed just before it builds the encoder, so this is
    the encoder the run started from (batch-norm statistics at their initial 0 and 1).
    """
    import torch

    from dimcli.modelfile import read_metadata, save_encoder
    from dimcli.models import build_encoder

    meta = read_metadata(trained)
    enc = meta["encoder"]
    torch.manual_seed(seed)
    encoder = build_encoder(
        enc["name"], image_size=enc.get("image_size"), feature_dim=int(enc["feature_dim"])
    )
    save_encoder(
        encoder,
        out,
        preprocessing=meta["preprocessing"],
        training={"untrained": True, "seed": seed, "baseline_for": trained.name},
    )


def probe_pair(features: Path, name: str, layer: str, *, seed: int) -> dict[str, Any]:
    """Linear and kNN probes of one model and layer: fit on train rows, score on test rows."""
    from dimcli.features import read_features
    from dimcli.probe import labels_from_keys, run_probes

    x_train, keys_train = read_features(features / f"{name}-{layer}-train.npy")
    x_test, keys_test = read_features(features / f"{name}-{layer}-test.npy")
    report = run_probes(
        x_train,
        keys_train,
        labels_from_keys(keys_train),
        methods=PROBES,
        test_features=x_test,
        test_keys=keys_test,
        test_labels=labels_from_keys(keys_test),
        seed=seed,
    )
    doc = report.to_dict()
    doc["label"] = f"{name} encoder, {layer} layer"
    return doc


def print_summary(console: Console, demo: DemoResult, *, steps: int, epochs: int) -> None:
    """The trained-versus-random accuracy table and where every output is."""
    table = Table(title="test accuracy (top-1): trained vs. random init", title_justify="left")
    table.add_column("features")
    for method in PROBES:
        table.add_column(f"{method} probe", justify="right")
    for layer in DEMO_LAYERS:
        for name in MODELS:
            scores = demo.accuracy.get(f"{name}/{layer}", {})
            row = [f"{100 * scores[m]:.1f} %" if m in scores else "-" for m in PROBES]
            style = "bold" if name == "trained" else "dim"
            table.add_row(f"{name}, {layer} layer", *row, style=style)
    console.print(table)

    paths = Table(show_header=False, box=None, title="outputs", title_justify="left")
    paths.add_column("what", style="bold")
    paths.add_column("where")
    paths.add_row("report", str(demo.report))
    paths.add_row("trained model", str(demo.model))
    paths.add_row("random-init model", str(demo.random_model))
    paths.add_row("features", str(demo.features))
    paths.add_row("probe reports", str(demo.out / "probe*.json"))
    paths.add_row("timings", str(demo.out / SUMMARY_FILE))
    console.print(paths)
    total = demo.seconds.get("total", 0.0)
    console.print(
        f"trained {steps} steps ({epochs} epochs); demo took {total:.0f} s "
        f"(training {demo.seconds.get('train', 0.0):.0f} s). Open the report: {demo.report}",
        highlight=False,
    )
