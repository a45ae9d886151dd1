"""`dim report`: a self-contained HTML report of a run (a thin layer over dimcli.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dimcli.cli._app import command, examples


@command(
    "report",
    epilog=examples(
        "dim report runs/latest",
        "dim report runs/latest --images test-images/ -o test-report.html",
    ),
)
def report_command(
    run: Annotated[
        Path,
        typer.Argument(
            metavar="RUN",
            help="Run folder of `dim train` (e.g. runs/latest).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="HTML file to write. (default: RUN/report.html)", show_default=False
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Image folder for the nearest-neighbour section. (default: the run's images)",
            show_default=False,
        ),
    ] = None,
    features: Annotated[
        Path | None,
        typer.Option(
            help="Feature file of those images (from `dim encode`). (default: encode up to "
            "2000 of them with the run's model)",
            show_default=False,
        ),
    ] = None,
    probe: Annotated[
        Path | None,
        typer.Option(
            help="Probe JSON report (from `dim probe`). (default: RUN/probe.json, "
            "RUN/probe-*.json)",
            show_default=False,
        ),
    ] = None,
    layer: Annotated[
        str,
        typer.Option(help="Layer encoded for the neighbours when no --features: conv | fc | y."),
    ] = "conv",
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours shown per query.")] = 5,
    queries: Annotated[int, typer.Option(help="Query images shown.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed that picks the query images.")] = 0,
) -> None:
    """Write a single HTML file with training curves, neighbours, probe results and settings.

    The figures also land as PNG files in RUN/figures/. The page needs no network and runs
    no scripts: open it in any browser, or attach it to a message.
    """
    from dimcli.report import write_report

    path = write_report(
        run,
        out,
        images=images,
        features=features,
        probe=probe,
        k=k,
        queries=queries,
        seed=seed,
        layer=layer,
    )
    typer.echo(f"wrote {path} (figures in {run / 'figures'})")
