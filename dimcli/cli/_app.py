"""The Typer application object and the decorator every command registers with."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from dimcli import __version__
from dimcli.errors import DimError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="dim",
    help="Deep InfoMax: learn image encoders from a folder, encode, probe and export them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register `func` as a `dim` sub-command; a `DimError` becomes one line and an exit code."""

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
