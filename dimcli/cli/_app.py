"""The Typer application object and the decorator every command registers with."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import typer
from typer.core import TyperCommand

try:  # recent typer carries its own copy of click
    from typer._click.exceptions import ClickException
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer, on top of click
    from click.exceptions import (  # type: ignore[import-not-found,no-redef,unused-ignore]
        ClickException,
    )
    from click.exceptions import (  # type: ignore[import-not-found,no-redef,unused-ignore]
        UsageError as ClickUsageError,
    )

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
    """A command whose usage line names its arguments in capitals: `IMAGES`, `[MODEL]`.

    `bare_values` names options whose value may be left out, and the value they take then
    (`{"--resume": "latest"}`: `--resume` alone means `--resume latest`); set it with
    `command(bare_values=...)`.
    """

    bare_values: ClassVar[Mapping[str, str]] = {}

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if self.bare_values:
            takes_value = {
                opt
                for param in self.get_params(ctx)
                if param.param_type_name == "option"
                and not getattr(param, "is_flag", False)
                and not getattr(param, "count", False)
                for opt in (*param.opts, *param.secondary_opts)
            }
            args = fill_bare_values(args, self.bare_values, takes_value)
        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as err:
            if err.ctx is None:  # `-o` without its value: say which command's help to read
                err.ctx, err.cmd = ctx, self
            raise

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


def fill_bare_values(
    args: Sequence[str], bare_values: Mapping[str, str], takes_value: Collection[str]
) -> list[str]:
    """`args` with each option of `bare_values` given without a value completed with its value.

    An option counts as given without a value when it ends the command line or the next word
    looks like an option (`-x`, `--x`, or the `--` that ends the options); otherwise the next
    word is its value, as for any option. So `dim train --resume` and `dim train --resume -q`
    continue the latest run, and `dim train --resume runs/x` continues runs/x. `takes_value`
    (every option that takes a value) keeps a value such as `--out --resume` from being read
    as an option.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            return [*out, arg, *args[i:]]
        following = args[i] if i < len(args) else None
        if arg in bare_values:
            if following is None or (following.startswith("-") and following != "-"):
                out.append(f"{arg}={bare_values[arg]}")
                continue
            out += [arg, following]
            i += 1
        elif arg in takes_value and following is not None:
            out += [arg, following]
            i += 1
        else:
            out.append(arg)
    return out


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
    example commands at the end of the command's --help, and `bare_values={"--opt": "value"}`
    to let `--opt` be given without a value (see `_Command`).
    """
    bare_values: Mapping[str, str] | None = kwargs.pop("bare_values", None)
    kwargs.setdefault("cls", _Command)
    if bare_values:
        kwargs["cls"] = type(
            kwargs["cls"].__name__, (kwargs["cls"],), {"bare_values": dict(bare_values)}
        )

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


def run_app(args: Sequence[str] | None = None) -> int:
    """Run `dim` with `args` (default: sys.argv[1:]) and return its exit code.

    Every error of the command line itself (an unknown option or command, a missing or bad
    value) prints one line, `error: <what> (see 'dim train --help')`, and returns 2, like the
    usage errors of dimcli's own checks; click's multi-line usage panel is not drawn. --help,
    --version, shell completion and `typer.Exit(code)` work as usual (completion exits
    from inside); Ctrl-C returns 130.
    """
    try:
        code = app(args=args, prog_name="dim", standalone_mode=False)
    except ClickUsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `dim` alone: the help, then exit 2
            message = err.format_message()
            if message.strip():  # already printed when typer draws the help with rich
                typer.echo(message, err=True)
            return err.exit_code
        typer.echo(usage_error_line(err), err=True)
        return err.exit_code
    except ClickException as err:
        typer.echo(f"error: {_one_line(err.format_message())}", err=True)
        return err.exit_code
    except typer.Abort:  # end of input at a prompt
        from typer import rich_utils

        rich_utils.rich_abort_error()
        return 1
    # Without standalone mode, typer returns the code of a typer.Exit, or what the command
    # returned (None; the commands return nothing).
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def usage_error_line(err: Any) -> str:
    """One line for click's usage error `err`: the message and where to read the usage."""
    message = _one_line(err.format_message()).replace(": Value error, ", ": ").rstrip(".")
    ctx = getattr(err, "ctx", None)
    if ctx is None:
        return f"error: {message} (see 'dim --help')"
    if ctx.command.get_help_option(ctx) is None:
        return f"error: {message}"
    names = ctx.help_option_names
    option = "--help" if "--help" in names else names[0]
    return f"error: {message} (see '{ctx.command_path} {option}')"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
