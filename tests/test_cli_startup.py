"""`dim --help`, `dim --version` and shell completion start without torch.

Building the command line (every command's options, help and defaults) must import none of
the heavy libraries; the commands import them when they run.
"""

from __future__ import annotations

import subprocess
import sys

from dimcli import __version__

HEAVY = ("torch", "torchvision", "numpy", "safetensors", "PIL")


def test_building_the_cli_imports_nothing_heavy() -> None:
    code = (
        "import sys, typer.main\n"
        "from dimcli.cli import app\n"
        "typer.main.get_command(app)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported at startup: {done.stdout.strip()}"


def test_version_runs_and_prints_the_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dimcli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dimcli {__version__}"
