"""`dim export --model RUN -o encoder.onnx` and `dim info MODEL`: ship and inspect model files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from dimcli._constants import DEFAULT_OPSET, FORMATS
from dimcli.cli._app import check_verbosity, command, examples

# dimcli.export (torch) loads only when a command runs, not for --help or completion.


@command(
    "export",
    epilog=examples(
        "dim export -m runs/latest -o encoder.onnx",
        "dim export -m runs/latest -o encoder.pt --layer fc",
    ),
)
def export(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="File to write; the extension picks the format: "
            + ", ".join(f"{suffix} ({name})" for name, suffix in FORMATS.items())
            + ".",
        ),
    ],
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Run folder of `dim train` or a .safetensors file."),
    ] = "runs/latest",
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help=f"Format when the extension does not say: {', '.join(FORMATS)}.",
        ),
    ] = None,
    layer: Annotated[
        Literal["y", "fc", "conv"],
        typer.Option(
            help="Output of the exported graph: the representation y, the fc layer, or the "
            "conv map flattened to C*H*W values (as `dim encode --layer conv`)."
        ),
    ] = "y",
    opset: Annotated[int, typer.Option(help="ONNX opset version (ONNX only).")] = DEFAULT_OPSET,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            "--force",
            help="Replace an existing output file (only once the export has verified).",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress line and no summary.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also describe the written file, as `dim info` does."),
    ] = False,
) -> None:
    """Export a trained encoder to ONNX, TorchScript, torch.export (.pt2) or safetensors.

    The exported graph takes a normalised float32 batch (N, 3, S, S) and returns one (N, D)
    tensor. The preprocessing (input size, mean, std, resize) is stored in the file and
    printed. The written file is loaded back and compared with PyTorch on a new batch size
    before it replaces the output; on failure nothing is written and the exit code is 1.
    """
    check_verbosity(quiet, verbose)
    from dimcli.export import describe_model, export_encoder, format_description

    result = export_encoder(
        model,
        out,
        fmt=fmt,
        layer=layer,
        opset=opset,
        verify=True,
        overwrite=overwrite,
        progress=None if quiet else lambda message: typer.echo(message, err=True),
    )
    if not quiet:
        typer.echo(result.summary())
    if verbose:
        typer.echo(format_description(describe_model(out)))


@command(
    "info",
    epilog=examples("dim info runs/latest", "dim info encoder.onnx --json"),
)
def info(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="Run folder, .safetensors model file, or a file written by `dim export`.",
        ),
    ] = "runs/latest",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of text.")
    ] = False,
) -> None:
    """Describe a model file: encoder, input, layers, parameters, training, size and SHA-256.

    The weights are loaded and checked as `dim encode` would, so a bad file gives the same
    one-line error. Files written by `dim export` are described from their metadata.
    """
    from dimcli.export import describe_model, format_description

    description = describe_model(model)
    if as_json:
        typer.echo(json.dumps(description, indent=2))
    else:
        typer.echo(format_description(description))
