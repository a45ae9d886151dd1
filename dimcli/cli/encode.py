"""`dim encode IMAGES -o feats.npy`: features of every image of a folder, streamed to a file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import typer

from dimcli.cli._app import check_verbosity, command, examples
from dimcli.errors import DimError, UsageError

# torch and the models load only when the command runs, not for --help or completion.


@command(
    "encode",
    epilog=examples(
        "dim encode images/ -o feats.npy -m runs/latest",
        "dim encode images/ -o conv.csv --layer conv --pool avg",
    ),
)
def encode(
    images: Annotated[
        Path,
        typer.Argument(metavar="IMAGES", help="Folder of images to encode (searched recursively)."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Feature file; the extension picks the format: .npy (+ <stem>.index.csv "
            "naming each row's image), .npz (features + paths) or .csv (path, f0, f1, ...).",
        ),
    ] = Path("feats.npy"),
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Run folder of `dim train` or a .safetensors file."),
    ] = "runs/latest",
    layer: Annotated[
        Literal["y", "fc", "conv"],
        typer.Option(help="Layer to read: the representation y, the fc layer, or the conv map."),
    ] = "y",
    pool: Annotated[
        Literal["none", "avg"],
        typer.Option(
            help="With --layer conv: none flattens the map (C*H*W values), avg averages it "
            "over locations (C values)."
        ),
    ] = "none",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    workers: Annotated[
        str, typer.Option(help="Decoding processes, or auto (one per CPU less one, at most 8).")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[
        Literal["auto", "fp32", "bf16"],
        typer.Option(help="auto = bf16 autocast on CUDA, fp32 elsewhere. Rows are float32."),
    ] = "auto",
    on_bad_image: Annotated[
        Literal["skip", "fail"],
        typer.Option(
            help="skip: leave undecodable images out and list them in <stem>.skipped.txt "
            "beside the output; fail: stop at the first one."
        ),
    ] = "skip",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            "--force",
            help="Replace an existing output file (it is replaced only once encoding succeeds).",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress and no summary line.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also print the model, layer and settings before encoding."
        ),
    ] = False,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            help="Encode with this many processes on this node (one per GPU, or CPU "
            "processes), started by torchrun's launcher; see docs/distributed.md.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Encode a folder of images with a trained encoder, one feature row per image.

    Rows follow the sorted image paths.
    The output appears only once every image is done: an interrupted encode leaves none.
    An existing output is kept unless --overwrite is given.
    """
    check_verbosity(quiet, verbose)
    if nproc_per_node is not None and nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    from dimcli import distributed
    from dimcli.encode import encode_folder

    if nproc_per_node is not None and nproc_per_node > 1 and not distributed.in_worker():
        # Start the processes; each runs this command again without --nproc-per-node.
        args = distributed.option_args(
            {
                "out": out,
                "model": model,
                "layer": layer,
                "pool": pool,
                "batch_size": batch_size,
                "workers": workers,
                "device": device,
                "precision": precision,
                "on_bad_image": on_bad_image,
                "overwrite": overwrite or None,
                "quiet": quiet or None,
                "verbose": verbose or None,
            }
        )
        code = distributed.launch(["encode", *args, "--", str(images)], nproc_per_node)
        if code:
            raise typer.Exit(code)
        return
    try:
        if verbose:
            # Every process reads the model here, so a bad one fails them all alike.
            line = describe_inputs(
                images,
                out,
                model,
                layer,
                pool,
                batch_size=batch_size,
                workers=workers,
                device=device,
            )
            if distributed.is_main_process():
                typer.echo(line, err=True)
        result = encode_folder(
            images,
            out,
            model=model,
            layer=layer,
            pool=pool,
            batch_size=batch_size,
            workers=parse_workers(workers),
            device=device,
            precision=precision,
            on_bad_image=on_bad_image,
            progress=not quiet,
            overwrite=overwrite,
        )
    except DimError as err:
        if not distributed.is_main_process():
            raise typer.Exit(err.exit_code) from None  # rank 0 prints the error
        raise
    if not quiet and distributed.is_main_process():
        typer.echo(result.summary())


def describe_inputs(
    images: Path,
    out: Path,
    model: str,
    layer: str,
    pool: str,
    *,
    batch_size: int,
    workers: str,
    device: str,
) -> str:
    """One line for --verbose: the model file and layer, the row width and the settings."""
    from dimcli.modelfile import read_metadata, resolve_model_path

    path = resolve_model_path(model)
    meta = read_metadata(path)
    shape = [int(v) for v in meta["layers"][layer]]
    width = shape[0] if layer == "conv" and pool == "avg" else math.prod(shape)
    how = f"layer {layer}" + (f", pool {pool}" if layer == "conv" else "")
    return (
        f"encoding {images} with {path} ({meta['encoder']['name']}, {how}: {width} values "
        f"per image) into {out}; batch size {batch_size}, workers {workers}, device {device}"
    )


def parse_workers(value: str) -> int | None:
    """--workers: "auto" -> None (pick from the CPU count), else a count >= 0."""
    if value.strip().lower() == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        raise UsageError(
            f"--workers must be auto or a number of processes, got {value!r}"
        ) from None
    if count < 0:
        raise UsageError(f"--workers must be 0 (decode in the main process) or more, got {count}")
    return count
