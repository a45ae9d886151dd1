"""The `dim` command line: a thin layer over the library.

Each command lives in its own module in this package and registers itself on `app` with
`dimcli.cli._app.command`. Errors the user can fix (`DimError`) print as one line and exit
non-zero; so do errors of the command line itself (an unknown option, a missing value: exit
2, see `dimcli.cli._app.run_app`). Anything else that escapes is a bug.
"""

from __future__ import annotations

import os
import sys

from dimcli.cli import demo as _demo  # noqa: F401
from dimcli.cli import encode as _encode  # noqa: F401
from dimcli.cli import export as _export  # noqa: F401
from dimcli.cli import probe as _probe  # noqa: F401
from dimcli.cli import report as _report  # noqa: F401

# Importing a command module registers its command (one import per line).
# ---- commands ----
from dimcli.cli import train as _train  # noqa: F401
from dimcli.cli._app import app

# ---- end commands ----

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `dim` console script.

    Colour follows the terminal: none when output is not a terminal, and none when NO_COLOR
    is set (https://no-color.org). rich drops colours under NO_COLOR by itself but keeps bold
    and dim; the help that typer draws goes fully plain instead. Usage errors are one plain
    line: `error: No such option: --foo (see 'dim train --help')`, exit code 2.
    """
    if os.environ.get("NO_COLOR"):
        from typer import rich_utils

        rich_utils.COLOR_SYSTEM = None
    from dimcli.cli._app import run_app

    sys.exit(run_app())
