"""The Typer application object and the decorator every command registers with."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer.core import TyperCommand

from dimcli import __version__
from dimcli.errors import DimError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="dim",
    help="Deep InfoMax: learn image encoders from a folder, encode, probe and export them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


class _Command(TyperCommand):
    """A command whose usage line names its arguments in capitals: `IMAGES`, `[MODEL]`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        # Typer writes a required argument as {images}; the usual spelling is IMAGES.
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            name = param.metavar or (param.name or "").upper()
            pieces.append(name if param.required else f"[{name}]")
        return pieces


def examples(*lines: str) -> str:
    """The epilog of a command's --help: a heading and one example command per line."""
    return "[bold]Examples[/bold]\n\n" + "\n".join(f"  {line}" for line in lines)


def check_verbosity(quiet: bool, verbose: bool) -> None:
    """Refuse --quiet together with --verbose (they ask for opposite things)."""
    if quiet and verbose:
        raise UsageError("--quiet and --verbose contradict each other; pass one of them")


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register `func` as a `dim` sub-command; a `DimError` becomes one line and an exit code.

    Keyword arguments go to `typer.Typer.command`; pass `epilog=examples(...)` to show
    example commands at the end of the command's --help.
    """
    kwargs.setdefault("cls", _Command)

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except DimError as err:
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(err.exit_code) from None

        app.command(name, **kwargs)(run)
        return func

    return decorate


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dimcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Deep InfoMax: learn image encoders from a folder, encode, probe and export them."""
