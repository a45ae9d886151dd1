"""Errors of the command line itself, as the `dim` console script prints them.

click's own parse errors (an unknown option or command, a missing or bad value) print one
line, `error: <click's message> (see 'dim <command> --help')`, and exit 2, like the usage
errors of dimcli's own checks; no usage panel, no traceback. (Those, such as `dim train x
--estimator bogus`, are tested with the commands: checking a setting imports torch.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DIM = Path(sys.executable).with_name("dim")

pytestmark = pytest.mark.skipif(not DIM.exists(), reason=f"console script not installed at {DIM}")


def _dim(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dimcli"] if module else [str(DIM)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIM_", "_DIM_"))}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.mark.parametrize(
    ("args", "mentions", "help_of"),
    [
        # an unknown option, long and short
        (["train", "x", "--foo"], ["No such option: --foo"], "dim train"),
        (["encode", "imgs", "-z"], ["No such option: -z"], "dim encode"),
        (["-x"], ["No such option: -x"], "dim"),
        # a missing option value, short and long
        (["encode", "imgs", "-o"], ["Option '-o' requires an argument"], "dim encode"),
        (["train", "x", "--epochs"], ["Option '--epochs' requires an argument"], "dim train"),
        # a bad choice
        (["encode", "imgs", "--layer", "bogus"], ["'--layer'", "'bogus'"], "dim encode"),
        # a missing argument
        (["encode"], ["Missing argument 'IMAGES'"], "dim encode"),
        # an unknown command, with click's suggestion
        (["trian"], ["No such command 'trian'", "Did you mean 'train'?"], "dim"),
        # a misspelt option, with click's suggestion
        (["encode", "imgs", "--layr", "y"], ["--layr", "--layer"], "dim encode"),
    ],
)
def test_usage_error_is_one_line_with_the_help_to_read(
    args: list[str], mentions: list[str], help_of: str
) -> None:
    done = _dim(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and done.stderr.endswith("\n"), done.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert line.endswith(f" (see '{help_of} --help')"), line
    for text in mentions:
        assert text in line, line
    assert done.stdout == ""


def test_python_dash_m_prints_the_same_line() -> None:
    done = _dim("trian", module=True)
    assert done.returncode == 2
    assert done.stderr == (
        "error: No such command 'trian'. Did you mean 'train'? (see 'dim --help')\n"
    )


def test_version_help_and_no_arguments_are_unchanged() -> None:
    version = _dim("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("dimcli ")
    helped = _dim("train", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: dim train [OPTIONS] [IMAGES]" in helped.stdout and helped.stderr == ""
    bare = _dim()  # the help, and the usage-error code, as click does
    assert bare.returncode == 2
    assert "Usage: dim [OPTIONS] COMMAND [ARGS]..." in bare.stdout
    assert "error" not in bare.stderr.lower()
