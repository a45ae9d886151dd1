"""The `dim` command line: a thin layer over the library.

Each command lives in its own module in this package and registers itself on `app` with
`dimcli.cli._app.command`. Errors the user can fix (`DimError`) print as one line and exit
non-zero; anything else that escapes is a bug.
"""

from __future__ import annotations

import os

from dimcli.cli._app import app

# Importing a command module registers its command (one import per line).
# ---- commands ----
# ---- end commands ----

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `dim` console script."""
    if os.environ.get("NO_COLOR"):
        os.environ.setdefault("TERM", "dumb")
    app(prog_name="dim")
