"""`dim train`: learn a DIM encoder from a folder of images (a thin layer over dimcli.train)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from dimcli.cli._app import check_verbosity, command, examples
from dimcli.errors import DimError, UsageError
from dimcli.settings import FIELDS, load_settings, to_toml

_DATA = "Data"
_MODEL = "Model and objective"
_OPTIM = "Optimisation"
_HARDWARE = "Hardware"
_RUN = "Run folder and output"
_MULTI = "Several processes (see docs/distributed.md)"


@command(
    "train",
    epilog=examples(
        "dim train images/ --out runs/first --epochs 20",
        "dim train --resume",
    ),
    bare_values={"--resume": "latest"},
)
def train_command(
    images: Annotated[
        str | None,
        typer.Argument(
            metavar="IMAGES",
            help="Folder of training images (searched recursively).",
            show_default=False,
        ),
    ] = None,
    # ---- data ----
    augment: Annotated[
        str | None,
        typer.Option(
            help="none | flip | crop-flip; default: none at 32 px, crop-flip above.",
            rich_help_panel=_DATA,
            show_default=False,
        ),
    ] = None,
    on_bad_image: Annotated[
        str | None,
        typer.Option(
            help="skip (warn, list in skipped.txt) | fail. (default: skip)",
            rich_help_panel=_DATA,
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Image-decoding processes. (default: CPUs - 1, at most 8)",
            rich_help_panel=_DATA,
            show_default=False,
        ),
    ] = None,
    # ---- model and objective ----
    encoder: Annotated[
        str | None,
        typer.Option(
            help="conv32 | alex64 | resnet18 | resnet50. (default: conv32)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Input size in pixels. (default: the encoder's)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    feature_dim: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Size of the representation y. (default: 64)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    mi_units: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Critic width. (default: 2048)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    estimator: Annotated[
        str | None,
        typer.Option(
            help="MI estimator: jsd | nce | dv. (default: jsd)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="dim-l (alpha 0, beta 1, gamma 0.1) | dim-g (1, 0, 1) | "
            "dim-lg (0.5, 0.1, 0.1). (default: dim-l)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    alpha: Annotated[
        str | None,
        typer.Option(
            metavar="FLOAT",
            help="Weight of the global MI term. (default: the preset's)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    beta: Annotated[
        str | None,
        typer.Option(
            metavar="FLOAT",
            help="Weight of the local MI term. (default: the preset's)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    gamma: Annotated[
        str | None,
        typer.Option(
            metavar="FLOAT",
            help="Weight of the prior-matching term. (default: the preset's)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    local_mi_kernel: Annotated[
        str | None,
        typer.Option(
            help="auto | fused | reference. (default: auto)",
            rich_help_panel=_MODEL,
            show_default=False,
        ),
    ] = None,
    # ---- optimisation ----
    epochs: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Epochs. (default: 10, or unbounded with --max-steps)",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    max_steps: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Stop after this many steps in all.",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Images per step (at least 2). (default: 64)",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    lr: Annotated[
        str | None,
        typer.Option(
            metavar="FLOAT",
            help="Adam learning rate. (default: 1e-4)",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    beta1: Annotated[
        str | None,
        typer.Option(
            metavar="FLOAT",
            help="Adam beta1. (default: 0.5)",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    beta2: Annotated[
        str | None,
        typer.Option(
            metavar="FLOAT",
            help="Adam beta2. (default: 0.999)",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    disc_lr: Annotated[
        str | None,
        typer.Option(
            metavar="FLOAT",
            help="Prior discriminator learning rate. (default: --lr)",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    gp_weight: Annotated[
        str | None,
        typer.Option(
            metavar="FLOAT",
            help="Gradient penalty on the discriminator. (default: 0)",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Seed of weights, data order and augmentation. (default: 0)",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="Deterministic kernels: bitwise repeatable runs, slower.",
            rich_help_panel=_OPTIM,
            show_default=False,
        ),
    ] = None,
    # ---- hardware ----
    device: Annotated[
        str | None,
        typer.Option(
            help="auto | cpu | cuda | cuda:N | mps. (default: auto)",
            rich_help_panel=_HARDWARE,
            show_default=False,
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="auto | fp32 | bf16 | fp16. (default: auto = bf16 on CUDA "
            "GPUs that have it, fp32 elsewhere)",
            rich_help_panel=_HARDWARE,
            show_default=False,
        ),
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="Channels-last memory format. (default: on for CPU and CUDA)",
            rich_help_panel=_HARDWARE,
            show_default=False,
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the encoder (slow start, faster steps). (default: off)",
            rich_help_panel=_HARDWARE,
            show_default=False,
        ),
    ] = None,
    # ---- several processes ----
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            metavar="INT",
            help="Train as this many processes (one per GPU, or CPU processes), started by "
            "torchrun's launcher. Under torchrun itself, leave it out.",
            rich_help_panel=_MULTI,
            show_default=False,
        ),
    ] = None,
    negatives: Annotated[
        str | None,
        typer.Option(
            help="global (score against every process's images) | local (each process's own "
            "share). (default: global)",
            rich_help_panel=_MULTI,
            show_default=False,
        ),
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help="BatchNorm statistics over the global batch (CUDA). (default: off)",
            rich_help_panel=_MULTI,
            show_default=False,
        ),
    ] = None,
    # ---- run folder ----
    out: Annotated[
        str | None,
        typer.Option(
            metavar="PATH",
            help="Run folder. (default: runs/<YYYYmmdd-HHMMSS>)",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            metavar="RUN",
            help="Continue a run: its folder, or 'latest' (runs/latest), which is what "
            "--resume alone means.",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    save_every: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Checkpoint every N steps (and at each epoch end). (default: 1000)",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    log_every: Annotated[
        str | None,
        typer.Option(
            metavar="INT",
            help="Log a line and a metrics.jsonl record every N steps. (default: 50)",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    on_nonfinite: Annotated[
        str | None,
        typer.Option(
            help="fail (stop, keep the last checkpoint) | skip (skip the step). (default: fail)",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        bool | None,
        typer.Option(
            "--report/--no-report",
            help="Write the visual report at the end. (default: off)",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    # ---- not settings: where settings come from, and how much is printed ----
    config: Annotated[
        str | None,
        typer.Option(
            metavar="PATH",
            help="TOML file of settings (flat keys named like the options).",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the resolved settings as TOML and exit.",
            rich_help_panel=_RUN,
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Print only errors and the model path.", rich_help_panel=_RUN
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also print the settings and every save.", rich_help_panel=_RUN
        ),
    ] = False,
) -> None:
    """Train a Deep InfoMax encoder on a folder of images.

    Settings: options > DIM_<FIELD> variables > --config file > defaults.
    The run folder gets encoder.safetensors, config.json, metrics.jsonl, a checkpoint.
    Ctrl-C saves and stops; `dim train --resume` continues the latest run.
    """
    given = dict(locals())  # every parameter above, by name
    cli = {name: given[name] for name in FIELDS}
    check_verbosity(quiet, verbose)
    if nproc_per_node is not None and nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    settings = load_settings(cli, config=config)
    if print_config:
        typer.echo(to_toml(settings), nl=False)
        return
    from dimcli import distributed  # torch and the models load only when training

    if nproc_per_node is not None and nproc_per_node > 1 and not distributed.in_worker():
        # Start the processes; each runs this command again, without --nproc-per-node.
        options = {name: value for name, value in cli.items() if name != "images"}
        options.update(config=config, quiet=quiet or None, verbose=verbose or None)
        args = distributed.option_args(options)
        if images is not None:
            args += ["--", images]
        code = distributed.launch(["train", *args], nproc_per_node)
        if code:
            raise typer.Exit(code)
        return

    from dimcli.train import train

    try:
        result = train(
            settings, console=Console(), verbosity=-1 if quiet else (1 if verbose else 0)
        )
    except DimError as err:
        if not distributed.is_main_process():
            raise typer.Exit(err.exit_code) from None  # rank 0 prints the error
        raise
    if not distributed.is_main_process():
        return
    if result.interrupted is not None:
        typer.echo(
            f"interrupted at step {result.steps}; resume with: dim train --resume {result.run_dir}",
            err=True,
        )
        raise typer.Exit(128 + int(result.interrupted))
