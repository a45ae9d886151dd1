"""`dim probe`: how well frozen features predict labels (linear, kNN and MLP probes).

Features come from a feature file of `dim encode` (`--features`) or are encoded on the fly
from `--images` with `--model` into a temporary file. Labels come from a CSV
(`--labels`, header path,label) or from each image's class folder (`--labels-from-folders`).
The test rows are a separate set when `--test-features`/`--test-images` is given; the rows of
the same features labelled in `--test-labels` when only that is given (`--labels` then names
the training rows); otherwise a stratified `--test-fraction` of the labelled rows drawn with
`--seed`.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from dimcli._constants import DEFAULT_K, DEFAULT_MLP_EPOCHS, PROBE_METHODS
from dimcli.cli._app import check_verbosity, command, examples
from dimcli.cli.encode import parse_workers
from dimcli.errors import UsageError

# numpy, torch and the probes load only when the command runs, not for --help or completion.
if TYPE_CHECKING:
    import numpy as np

    from dimcli.probe import ProbeReport


def parse_methods(values: Sequence[str] | None) -> list[str]:
    """--method values (repeated and/or comma-separated, "all") -> probe names, in order.

    Raises:
        UsageError: an unknown method name.
    """
    methods: list[str] = []
    for value in values or ["linear"]:
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                methods.extend(PROBE_METHODS)
            elif name in PROBE_METHODS:
                methods.append(name)
            else:
                raise UsageError(
                    f"unknown --method {name!r}; choose from {', '.join(PROBE_METHODS)} or all"
                )
    if not methods:
        raise UsageError(f"--method is empty; choose from {', '.join(PROBE_METHODS)} or all")
    return list(dict.fromkeys(methods))  # each method once, first mention first


@command(
    "probe",
    epilog=examples(
        "dim probe --features feats.npy --labels labels.csv --method all",
        "dim probe --images images/ --test-images test-images/ --labels-from-folders "
        "-m runs/latest",
    ),
)
def probe(
    labels: Annotated[
        Path | None,
        typer.Option(help="CSV with a header path,label; paths relative to the encoded folder."),
    ] = None,
    labels_from_folders: Annotated[
        bool,
        typer.Option(
            "--labels-from-folders",
            help="Label each image by its first folder (IMAGES/<class>/...).",
        ),
    ] = False,
    features: Annotated[
        Path | None,
        typer.Option(help="Feature file of `dim encode` (default: feats.npy)."),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(help="Encode this folder on the fly (instead of --features)."),
    ] = None,
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Model for --images/--test-images."),
    ] = "runs/latest",
    layer: Annotated[
        Literal["y", "fc", "conv"], typer.Option(help="Layer to encode with --images.")
    ] = "y",
    pool: Annotated[
        Literal["none", "avg"], typer.Option(help="With --layer conv: none or avg.")
    ] = "none",
    test_labels: Annotated[
        Path | None,
        typer.Option(
            help="Labels of the test set (default: --labels). Without --test-features or "
            "--test-images, the test rows are the rows of the same features it labels."
        ),
    ] = None,
    test_features: Annotated[
        Path | None,
        typer.Option(help="Feature file of a separate test set."),
    ] = None,
    test_images: Annotated[
        Path | None,
        typer.Option(help="Folder of a separate test set, encoded on the fly."),
    ] = None,
    test_fraction: Annotated[
        float,
        typer.Option(help="Share of each class held out for testing when no test set is given."),
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split and the probes.")] = 0,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="linear, knn, mlp or all; repeat it or give a comma list (default: linear).",
        ),
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Neighbours of the kNN probe.")] = DEFAULT_K,
    mlp_epochs: Annotated[
        int, typer.Option(help="Training epochs of the MLP probe.")
    ] = DEFAULT_MLP_EPOCHS,
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also print the accuracy of each class.")
    ] = False,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the full report (with confusion matrices) here."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size when encoding on the fly.")] = 256,
    workers: Annotated[str, typer.Option(help="Decoding processes when encoding.")] = "auto",
    device: Annotated[str, typer.Option(help="Device when encoding on the fly.")] = "auto",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No encoding progress; only the results.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Also print where features, labels and the test set come from, and the "
            "probes' settings.",
        ),
    ] = False,
) -> None:
    """Train probes on frozen features and report their test accuracy."""
    # ==== check the options against each other ====
    check_verbosity(quiet, verbose)
    if labels is None and not labels_from_folders:
        raise UsageError(
            "say where labels come from: --labels labels.csv (header path,label) or "
            "--labels-from-folders"
        )
    if labels is not None and labels_from_folders:
        raise UsageError("give either --labels or --labels-from-folders, not both")
    if features is not None and images is not None:
        raise UsageError("give either --features or --images (encode on the fly), not both")
    if test_features is not None and test_images is not None:
        raise UsageError("give either --test-features or --test-images, not both")
    has_test_set = test_features is not None or test_images is not None
    if test_labels is not None and labels_from_folders:
        raise UsageError(
            "--labels-from-folders labels the test set by its folders too; drop --test-labels"
        )
    methods = parse_methods(method)
    n_workers = parse_workers(workers)
    if verbose:
        described = describe_inputs(
            labels=labels,
            features=features,
            images=images,
            test_labels=test_labels,
            test_features=test_features,
            test_images=test_images,
            test_fraction=test_fraction,
            model=model,
            layer=layer,
            pool=pool,
        )
        for line in [*described, describe_probes(methods, k, mlp_epochs, seed)]:
            typer.echo(line)

    from dimcli.encode import encode_folder
    from dimcli.features import read_features
    from dimcli.probe import check_disjoint_labels, labels_from_keys, read_labels_csv, run_probes

    # ==== labels first: a bad CSV should fail before any encoding ====
    train_labels = read_labels_csv(labels) if labels is not None else None
    test_label_map = read_labels_csv(test_labels) if test_labels is not None else None
    if not has_test_set and train_labels is not None and test_label_map is not None:
        # The test rows come from the same features, so the two CSVs must not share a path.
        check_disjoint_labels(train_labels, test_label_map, names=(str(labels), str(test_labels)))

    with contextlib.ExitStack() as stack:
        # ==== features: from files, or encoded into a temporary folder ====
        def source(file: Path | None, folder: Path | None, name: str) -> Path:
            if folder is None:
                return file if file is not None else Path("feats.npy")
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dim-probe-")))
            result = encode_folder(
                folder,
                tmp / f"{name}.npy",
                model=model,
                layer=layer,
                pool=pool,
                batch_size=batch_size,
                workers=n_workers,
                device=device,
                on_bad_image="skip",
                progress=not quiet,
            )
            if verbose:
                typer.echo(
                    f"encoded {folder}: {result.n_rows} rows x {result.dim} dims, "
                    f"{result.n_skipped} images skipped"
                )
            return result.out

        x, keys = read_features(source(features, images, "train"))
        x_test: np.ndarray | None = None
        keys_test: list[str] | None = None
        if has_test_set:
            x_test, keys_test = read_features(source(test_features, test_images, "test"))

        # ==== probe ====
        if labels_from_folders:
            train_labels = labels_from_keys(keys)
            if keys_test is not None:
                test_label_map = labels_from_keys(keys_test)
        assert train_labels is not None, "labels were checked above"
        report = run_probes(
            x,
            keys,
            train_labels,
            methods=methods,
            test_features=x_test,
            test_keys=keys_test,
            test_labels=test_label_map,
            test_fraction=test_fraction,
            seed=seed,
            k=k,
            mlp_epochs=mlp_epochs,
        )

    # ==== report ====
    for line in describe_matching(report, same_features=not has_test_set):
        typer.echo(line)
    console = Console()
    console.print(results_table(report))
    if per_class:
        console.print(per_class_table(report))
    if json_out is not None:
        inputs = {
            "labels": "folders" if labels_from_folders else str(labels),
            "test_labels": str(test_labels) if test_labels is not None else None,
            "features": None if images is not None else str(features or "feats.npy"),
            "images": str(images) if images is not None else None,
            "test_features": str(test_features) if test_features is not None else None,
            "test_images": str(test_images) if test_images is not None else None,
            "model": model if images is not None or test_images is not None else None,
            "layer": layer if images is not None or test_images is not None else None,
            "pool": pool if images is not None or test_images is not None else None,
        }
        write_json_report(json_out, report, inputs)
        typer.echo(f"wrote the report to {json_out}")


def describe_inputs(
    *,
    labels: Path | None,
    features: Path | None,
    images: Path | None,
    test_labels: Path | None,
    test_features: Path | None,
    test_images: Path | None,
    test_fraction: float,
    model: str,
    layer: str,
    pool: str,
) -> list[str]:
    """Lines for --verbose: where the labels, the features and the test rows come from."""
    encoded = f"encoded with {model}, layer {layer}" + (f", pool {pool}" if layer == "conv" else "")
    lines = [f"labels: {labels if labels is not None else 'the first folder of each path'}"]
    if images is not None:
        lines.append(f"features: {images} ({encoded})")
    else:
        lines.append(f"features: {features if features is not None else 'feats.npy'}")
    if test_images is not None:
        lines.append(f"test set: {test_images} ({encoded})")
    elif test_features is not None:
        lines.append(f"test set: {test_features}")
    elif test_labels is not None:
        lines.append(f"test set: the rows of the same features labelled in {test_labels}")
    else:
        lines.append(f"test set: {test_fraction:g} of each class, held out")
    if test_labels is not None:
        lines.append(f"test labels: {test_labels}")
    return lines


def describe_probes(methods: Sequence[str], k: int, mlp_epochs: int, seed: int) -> str:
    """One line for --verbose: the probes and their settings."""
    named = {"knn": f"knn (k {k})", "mlp": f"mlp ({mlp_epochs} epochs)"}
    return f"probes: {', '.join(named.get(m, m) for m in methods)}; seed {seed}"


def describe_matching(report: ProbeReport, *, same_features: bool = False) -> Iterator[str]:
    """How many labelled rows matched, as lines for the terminal.

    `same_features`: the test rows come from the training features (`--test-labels` alone);
    then "rows without a label" are the rows labelled in neither CSV.
    """
    yield (
        f"labels: {report.n_matched} of {report.n_labels} labelled paths matched feature rows "
        f"({report.n_unmatched_labels} labels without a row, "
        f"{report.n_unlabelled_rows} rows without a label); {len(report.classes)} classes, "
        f"{report.dim} dims"
    )
    if report.test_counts is not None:
        t = report.test_counts
        where = "rows of the same features " if same_features else ""
        yield (
            f"test set: {t['n_matched']} of {t['n_labels']} labelled paths matched {where}"
            f"({t['n_unmatched_labels']} labels without a row, {t['n_unlabelled_rows']} rows "
            "without a label)"
        )
    else:
        yield (
            f"split: stratified, {report.test_fraction:g} of each class held out for testing, "
            f"seed {report.seed}"
        )


def results_table(report: ProbeReport) -> Table:
    """One row per probe: top-1, top-5 (more than 5 classes), macro-F1, n_train, n_test."""
    show_top5 = len(report.classes) > 5
    table = Table(title="probe results")
    table.add_column("method")
    table.add_column("top-1", justify="right")
    if show_top5:
        table.add_column("top-5", justify="right")
    table.add_column("macro-F1", justify="right")
    table.add_column("n_train", justify="right")
    table.add_column("n_test", justify="right")
    for r in report.results:
        cells = [r.method, _percent(r.top1)]
        if show_top5:
            cells.append(_percent(r.top5))
        cells += [f"{r.macro_f1:.3f}", str(r.n_train), str(r.n_test)]
        table.add_row(*cells)
    return table


def per_class_table(report: ProbeReport) -> Table:
    """Accuracy of each class (rows) under each probe (columns)."""
    table = Table(title="per-class accuracy")
    table.add_column("class")
    for r in report.results:
        table.add_column(r.method, justify="right")
    for name in report.classes:
        table.add_row(name, *(_percent(r.per_class.get(name)) for r in report.results))
    return table


def write_json_report(path: Path, report: ProbeReport, inputs: Mapping[str, Any]) -> None:
    """Write `report.to_dict()` plus the inputs it came from as JSON, atomically."""
    from dimcli.modelfile import atomic_write

    data = {"inputs": dict(inputs), **report.to_dict()}
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
