"""The `--help` of every command, its usage line, --quiet/--verbose, and colour (dimcli/cli)."""

from __future__ import annotations

import os
import pty
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.core import TyperCommand, TyperGroup
from typer.testing import CliRunner

from dimcli.cli import app
from dimcli.modelfile import save_encoder
from dimcli.models import build_encoder

COMMANDS = ("train", "encode", "probe", "export", "info", "report", "demo")
# Commands that print progress; each takes --quiet/-q and --verbose/-v.
PROGRESS = ("train", "encode", "probe", "export", "demo")
ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
ANSI = "\x1b["


def group() -> TyperGroup:
    command = typer.main.get_command(app)
    assert isinstance(command, TyperGroup)
    return command


def command(name: str) -> TyperCommand:
    found = group().commands[name]
    assert isinstance(found, TyperCommand)
    return found


def help_text(name: str) -> str:
    result = CliRunner().invoke(app, [name, "--help"], env=ENV, prog_name="dim")
    assert result.exit_code == 0, result.output
    return result.output


def examples(name: str) -> list[str]:
    """The example commands at the end of a command's --help."""
    return [line.strip() for line in (command(name).epilog or "").splitlines()[1:] if line.strip()]


# ==== help text ====


def test_every_command_is_tested_here() -> None:
    assert sorted(group().commands) == sorted(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_purpose_and_two_examples(name: str) -> None:
    text = help_text(name)
    purpose = (command(name).help or "").splitlines()[0]
    assert purpose.endswith(".") and purpose in text
    lines = examples(name)
    assert len(lines) >= 2, f"dim {name} --help shows {len(lines)} examples"
    assert "Examples" in text
    for line in lines:
        assert line.startswith(f"dim {name}"), line
        assert line in text, f"{line!r} is not shown whole in the help"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_examples_parse(name: str) -> None:
    # Parsing checks every option name and value without running anything.
    for line in examples(name):
        args = shlex.split(line)[2:]
        ctx = command(name).make_context(f"dim {name}", args)
        assert ctx.params is not None, line


@pytest.mark.parametrize(
    ("name", "usage"),
    [
        ("train", "dim train [OPTIONS] [IMAGES]"),
        ("encode", "dim encode [OPTIONS] IMAGES"),
        ("probe", "dim probe [OPTIONS]"),
        ("export", "dim export [OPTIONS]"),
        ("info", "dim info [OPTIONS] [MODEL]"),
        ("report", "dim report [OPTIONS] RUN"),
        ("demo", "dim demo [OPTIONS]"),
    ],
)
def test_usage_line_names_arguments_in_capitals(name: str, usage: str) -> None:
    line = next(line for line in help_text(name).splitlines() if "Usage:" in line)
    assert line.split("Usage:")[1].strip() == usage


# ==== --quiet and --verbose ====


@pytest.mark.parametrize("name", PROGRESS)
def test_progress_commands_take_quiet_and_verbose(name: str) -> None:
    options = {opt for param in command(name).params for opt in param.opts}
    assert {"--quiet", "-q", "--verbose", "-v"} <= options


@pytest.mark.parametrize(
    "args",
    [
        ["train", "images", "-q", "-v"],
        ["encode", "images", "-q", "-v"],
        ["probe", "--labels-from-folders", "-q", "-v"],
        ["export", "-o", "x.onnx", "-q", "-v"],
        ["demo", "-q", "-v"],
    ],
    ids=lambda args: args[0],
)
def test_quiet_with_verbose_is_a_usage_error(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 2
    assert "error: --quiet and --verbose contradict each other" in result.output
    assert not any(tmp_path.iterdir())


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A conv32 model file with random weights (y: 16 values)."""
    torch.manual_seed(0)
    path = tmp_path / "run" / "encoder.safetensors"
    preprocessing = {
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "resize": "shorter-side-center-crop",
    }
    save_encoder(build_encoder("conv32", feature_dim=16), path, preprocessing=preprocessing)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Six 32x32 images in two class folders."""
    from PIL import Image

    root = tmp_path / "images"
    for i in range(6):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 0, 255 - 40 * i)).save(folder / f"{i}.png")
    return root


def test_encode_verbose_names_model_layer_and_width(
    tmp_path: Path, model: Path, images: Path
) -> None:
    out = tmp_path / "f.npy"
    args = ["encode", str(images), "-o", str(out), "-m", str(model), "--workers", "0"]
    result = CliRunner().invoke(app, [*args, "--layer", "conv", "--pool", "avg", "-v"], env=ENV)
    assert result.exit_code == 0, result.output
    assert f"with {model} (conv32, layer conv, pool avg: 256 values per image)" in result.stderr
    assert "workers 0, device auto" in result.stderr


def test_encode_verbose_reports_a_bad_model_as_one_line(tmp_path: Path, images: Path) -> None:
    missing = tmp_path / "none.safetensors"
    result = CliRunner().invoke(app, ["encode", str(images), "-m", str(missing), "-v"], env=ENV)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: model") and "Traceback" not in result.output


def test_probe_verbose_says_where_everything_comes_from(model: Path, images: Path) -> None:
    args = ["probe", "--images", str(images), "--labels-from-folders", "-m", str(model)]
    result = CliRunner().invoke(
        app, [*args, "--method", "knn", "--k", "3", "--workers", "0", "-v"], env=ENV
    )
    assert result.exit_code == 0, result.output
    assert "labels: the first folder of each path" in result.output
    assert f"features: {images} (encoded with {model}, layer y)" in result.output
    assert "test set: 0.2 of each class, held out" in result.output
    assert "probes: knn (k 3); seed 0" in result.output
    assert f"encoded {images}: 6 rows x 16 dims, 0 images skipped" in result.output


def test_export_verbose_describes_the_written_file(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "copy.safetensors"
    result = CliRunner().invoke(app, ["export", "-m", str(model), "-o", str(out), "-v"], env=ENV)
    assert result.exit_code == 0, result.output
    assert f"file      {out}" in result.output and "sha256    " in result.output


def test_demo_quiet_prints_the_report_path_and_verbose_the_phases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    import dimcli.demo
    from dimcli.demo import DemoResult

    def fake_run_demo(out: Path | None, *, console: Console, **_: object) -> DemoResult:
        console.print("training ...")
        folder = tmp_path / "demo"
        return DemoResult(
            out=folder,
            report=folder / "report.html",
            model=folder / "encoder.safetensors",
            random_model=folder / "random-init.safetensors",
            features=folder / "features",
            seconds={"train": 2.0, "total": 3.5},
        )

    monkeypatch.setattr(dimcli.demo, "run_demo", fake_run_demo)
    quiet = CliRunner().invoke(app, ["demo", "-q"], env=ENV)
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == f"{tmp_path / 'demo' / 'report.html'}\n"
    verbose = CliRunner().invoke(app, ["demo", "-v"], env=ENV)
    assert verbose.exit_code == 0, verbose.output
    assert "training ..." in verbose.output
    assert "seconds per phase: train 2.0, total 3.5" in verbose.output


# ==== colour ====


def _dim_help(env: dict[str, str], *, terminal: bool) -> str:
    """`dim train --help` as a separate process, its output a terminal or a pipe."""
    command = [sys.executable, "-m", "dimcli", "train", "--help"]
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", **env}
    for name in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS", "TTY_COMPATIBLE"):
        env.pop(name, None)
    if not terminal:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen(command, env=env, stdout=follower, stderr=follower) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=120) == 0
    os.close(leader)
    return b"".join(chunks).decode("utf-8", errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_colour_only_on_a_terminal_without_no_color() -> None:
    env_without = {"NO_COLOR": ""}
    assert ANSI in _dim_help(env_without, terminal=True), "a terminal gets colours"
    assert ANSI not in _dim_help({"NO_COLOR": "1"}, terminal=True)
    assert ANSI not in _dim_help(env_without, terminal=False)


# ==== shell completion ====


def _dim(env: dict[str, str], *args: str, shell: str | None = None) -> subprocess.CompletedProcess:
    """`dim ARGS` as a user's shell runs it: the console script, optionally under `shell`."""
    script = str(Path(sys.executable).with_name("dim"))
    # "; exit $?" keeps the shell as dim's parent (a lone command would be exec'd in its place).
    command = [shell, "-c", shlex.join([script, *args]) + "; exit $?"] if shell else [script, *args]
    return subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(sys.platform == "win32" or not Path("/bin/bash").exists(), reason="needs bash")
def test_completion_scripts_and_completions(tmp_path: Path) -> None:
    # Detected from the shell that runs dim, as docs/usage.md says.
    shown = _dim({}, "--show-completion", shell="/bin/bash")
    assert shown.returncode == 0, shown.stderr
    assert "complete_bash" in shown.stdout and "_DIM_COMPLETE" in shown.stdout
    installed = _dim({"HOME": str(tmp_path)}, "--install-completion", shell="/bin/bash")
    assert installed.returncode == 0, installed.stderr
    assert "_DIM_COMPLETE=complete_bash" in (tmp_path / ".bash_completions" / "dim.sh").read_text()

    # A named shell's script, whatever shell runs the command.
    for shell in ("bash", "zsh", "fish", "powershell"):
        done = _dim({"_DIM_COMPLETE": f"source_{shell}"})
        assert done.returncode == 0, done.stderr
        assert f"complete_{shell}" in done.stdout

    # And the completions themselves: commands, then a command's options.
    words = {"_DIM_COMPLETE": "complete_bash", "COMP_CWORD": "1"}
    assert _dim({**words, "COMP_WORDS": "dim tr"}).stdout.split() == ["train"]
    options = _dim({**words, "COMP_WORDS": "dim encode --ov", "COMP_CWORD": "2"}).stdout
    assert options.split() == ["--overwrite"]
