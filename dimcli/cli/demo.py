"""`dim demo`: train, encode, probe and report on the bundled sample (over dimcli.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dimcli.cli._app import check_verbosity, command, examples


@command(
    "demo",
    epilog=examples("dim demo --quick", "dim demo --steps 20 --per-class 10 --out runs/demo-small"),
)
def demo_command(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for everything the demo writes. (default: runs/demo-<date>-<time>)",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Training epochs over the 2,000 sample images. (default: 15)", show_default=False
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Stop training after this many steps.", show_default=False),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Train 3 epochs instead of 15 (about a minute).")
    ] = False,
    per_class: Annotated[
        int | None,
        typer.Option(
            help="Use only the first N training images (and N/2 test images) of each class.",
            show_default=False,
        ),
    ] = None,
    mi_units: Annotated[int, typer.Option(help="Width of the MI critics.")] = 512,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Images per training step. (default: 64)", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the data order.")] = 0,
    workers: Annotated[
        int | None,
        typer.Option(help="Image-decoding processes. (default: automatic)", show_default=False),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for torch. (default: the cores that other processes leave idle)",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Print only errors and the path of the report."),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also print the seconds each phase took."),
    ] = False,
) -> None:
    """Learn an encoder on a bundled CIFAR-10 sample and compare it with a random one.

    Trains DIM(L) on 2,000 images (about three minutes on two CPU cores), encodes 1,000 test
    images, probes the features with linear and kNN classifiers next to the same encoder at
    its random initialisation, and writes an HTML report. Nothing is downloaded.
    """
    check_verbosity(quiet, verbose)
    from dimcli.demo import run_demo

    result = run_demo(
        out,
        epochs=epochs,
        steps=steps,
        quick=quick,
        per_class=per_class,
        mi_units=mi_units,
        batch_size=batch_size,
        seed=seed,
        workers=workers,
        device=device,
        threads=threads,
        console=Console(quiet=quiet),
    )
    if quiet:
        typer.echo(result.report)
    if verbose:
        phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.seconds.items())
        typer.echo(f"seconds per phase: {phases}")
