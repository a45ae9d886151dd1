"""Tests for dimcli/settings.py: layers and precedence, validation messages, TOML output."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dimcli.cli import app
from dimcli.errors import UsageError
from dimcli.settings import (
    DEFAULT_EPOCHS,
    FIELDS,
    TrainSettings,
    load_settings,
    read_config,
    to_toml,
    toml_value,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _load(cli: dict[str, Any] | None = None, **kw: Any) -> TrainSettings:
    kw.setdefault("environ", {})
    return load_settings(cli, **kw)


def _fails(match: str, cli: dict[str, Any] | None = None, **kw: Any) -> str:
    with pytest.raises(UsageError) as info:
        _load(cli, **kw)
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message, "usage errors are one line"
    return message


# ==== defaults and derived values ====


def test_defaults_follow_the_paper() -> None:
    s = _load()
    assert (s.estimator, s.preset, s.encoder) == ("jsd", "dim-l", "conv32")
    assert (s.batch_size, s.lr, s.beta1, s.beta2) == (64, 1e-4, 0.5, 0.999)
    assert (s.feature_dim, s.mi_units, s.gp_weight, s.seed) == (64, 2048, 0.0, 0)
    assert s.weights() == (0.0, 1.0, 0.1)
    assert s.resolved_image_size() == 32
    assert s.resolved_augment() == "none"  # CIFAR: no augmentation
    assert s.resolved_epochs() == DEFAULT_EPOCHS
    assert s.model_fields_set == set()


def test_derived_values() -> None:
    s = _load({"encoder": "alex64", "preset": "dim-g", "gamma": 0.5})
    assert s.resolved_image_size() == 64
    assert s.resolved_augment() == "crop-flip"  # STL-10 style for 64 px
    assert s.weights() == (1.0, 0.0, 0.5)
    only_steps = _load({"max_steps": 7})
    assert only_steps.resolved_epochs() is None  # max_steps alone bounds the run
    assert _load({"max_steps": 7, "epochs": 2}).resolved_epochs() == 2


def test_auto_selects_the_automatic_default() -> None:
    s = _load({"workers": "auto", "image_size": "AUTO", "channels_last": "auto"})
    assert s.workers is None and s.image_size is None and s.channels_last is None


# ==== precedence: CLI > env > file > defaults ====


def test_precedence_cli_env_file_defaults(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("batch_size = 16\nlr = 0.001\nseed = 5\nestimator = 'nce'\n")
    env = {"DIM_BATCH_SIZE": "24", "DIM_LR": "0.002", "DIM_ESTIMATOR": "dv"}
    s = load_settings({"batch_size": 32, "lr": None}, config=config, environ=env)
    assert s.batch_size == 32  # CLI beats env and file
    assert s.lr == 0.002  # env beats file (the CLI did not give it: None)
    assert s.estimator == "dv"
    assert s.seed == 5  # file beats defaults
    assert s.mi_units == 2048  # default
    assert s.model_fields_set == {"batch_size", "lr", "seed", "estimator"}


def test_config_from_dim_config_variable(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("mi-units = 128\n")  # dashes work like underscores
    s = load_settings(environ={"DIM_CONFIG": str(config)})
    assert s.mi_units == 128


def test_env_booleans_and_unrelated_variables() -> None:
    s = load_settings(
        environ={"DIM_DETERMINISTIC": "true", "DIM_COMPILE": "0", "DIM_UNRELATED_THING": "x"}
    )
    assert s.deterministic is True and s.compile is False


def test_misspelt_env_variable_is_rejected_with_suggestion() -> None:
    _fails("did you mean DIM_BATCH_SIZE?", environ={"DIM_BATCHSIZE": "8"})


# ==== config file errors ====


def test_unknown_config_key_suggests_nearest(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("batchsize = 8\n")
    message = _fails("unknown key 'batchsize'", config=config)
    assert "did you mean 'batch_size'?" in message
    assert str(config) in message


def test_unknown_config_key_without_near_match_lists_keys(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("zzzzzz = 1\n")
    _fails("valid names: images, augment", config=config)


def test_invalid_toml(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("batch_size = = 3\n")
    _fails("is not valid TOML", config=config)


def test_non_utf8_config(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_bytes(b"encoder = '\xff'\n")
    _fails("cannot read config file", config=config)


def test_missing_config_file(tmp_path: Path) -> None:
    _fails("config file not found", config=tmp_path / "nope.toml")


def test_table_in_config_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[batch_size]\nx = 1\n")
    _fails("is a table", config=config)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('batch_size = "big"', "batch_size: input should be a valid integer"),
        ("lr = [1, 2]", "lr: input should be a valid number"),
        ("deterministic = 3", "deterministic: input should be a valid boolean"),
        ("estimator = 1", "estimator: input should be 'jsd', 'nce' or 'dv'"),
        ("epochs = 2.5", "epochs: input should be a valid integer"),
    ],
)
def test_wrong_types_in_config_name_field_and_file(
    tmp_path: Path, line: str, expected: str
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(line + "\n")
    message = _fails(expected, config=config)
    assert f"(from {config})" in message


# ==== validation messages ====


@pytest.mark.parametrize(
    ("cli", "expected"),
    [
        ({"batch_size": 1}, "batch_size: must be at least 2 to have negatives, got 1"),
        ({"lr": 0}, "lr: must be a positive number such as 1e-4, got 0"),
        ({"lr": -1e-3}, "lr: must be a positive number"),
        ({"disc_lr": float("nan")}, "disc_lr: must be a positive number"),
        ({"alpha": -1}, "alpha: must be a finite number >= 0, got -1"),
        (
            {"alpha": 0, "beta": 0, "gamma": 0},
            "alpha, beta and gamma are all zero, so there is nothing to train",
        ),
        ({"image_size": 64}, "image_size: encoder conv32 takes image size exactly 32, got 64"),
        ({"image_size": 0}, "image_size: must be a positive number of pixels"),
        ({"encoder": "conv23"}, "encoder: unknown encoder 'conv23'; did you mean 'conv32'?"),
        ({"device": "gpu"}, "device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ({"beta1": 1.0}, "beta1: must be in [0, 1), got 1.0"),
        ({"epochs": 0}, "epochs: must be at least 1, got 0"),
        ({"workers": -1}, "workers: must be 0 (load in the main process) or more"),
        ({"seed": -3}, "seed: must be between 0 and 2**63 - 1"),
        ({"precision": "fp8"}, "precision: input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ({"augment": "rotate"}, "augment: input should be 'auto', 'none', 'flip' or 'crop-flip'"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite: input should be 'fail' or 'skip'"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(cli: dict[str, Any], expected: str) -> None:
    message = _fails(expected, cli)
    if len(cli) == 1:
        assert message.endswith(f"(from --{next(iter(cli)).replace('_', '-')})")


def test_several_problems_in_one_line() -> None:
    message = _fails("batch_size", {"batch_size": 0, "lr": -1})
    assert "lr: must be a positive number" in message and "; " in message


def test_unknown_python_keyword() -> None:
    _fails("unknown setting 'batchsize'; did you mean 'batch_size'?", {"batchsize": 3})


def test_env_source_is_named() -> None:
    message = _fails("batch_size: must be at least 2", environ={"DIM_BATCH_SIZE": "1"})
    assert message.endswith("(from DIM_BATCH_SIZE)")


# ==== property-based: no traceback for any value ====

_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=_ANY)
def test_any_value_gives_settings_or_a_usage_error_naming_the_field(field: str, value: Any) -> None:
    try:
        s = _load({field: value})
    except UsageError as err:
        assert str(err).startswith(f"{field}: "), str(err)
        return
    assert isinstance(s, TrainSettings)


_LETTERS = st.text(alphabet="abcdefghijklmopqrsuvwxyz", min_size=1, max_size=8).filter(
    lambda t: (
        t
        not in (
            "auto",
            "inf",
            "nan",
            "infinity",
            "true",
            "false",
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
            "t",
            "f",
            "cpu",
            "mps",
            "jsd",
            "dv",
            "skip",
            "fail",
            "none",
            "flip",
            "fused",
            "reference",
        )
    )
)
_INVALID: dict[str, st.SearchStrategy[Any]] = {
    "batch_size": st.integers(max_value=1) | _LETTERS,
    "epochs": st.integers(max_value=0) | _LETTERS,
    "max_steps": st.integers(max_value=0),
    "save_every": st.integers(max_value=0),
    "log_every": st.integers(max_value=0),
    "feature_dim": st.integers(max_value=0),
    "mi_units": st.integers(max_value=0),
    "workers": st.integers(max_value=-1),
    "seed": st.integers(max_value=-1) | st.integers(min_value=2**63),
    "lr": st.floats(max_value=0) | st.sampled_from([math.inf, math.nan]),
    "disc_lr": st.floats(max_value=0),
    "beta1": st.floats(min_value=1.0) | st.floats(max_value=-1e-9),
    "beta2": st.floats(min_value=1.0),
    "gp_weight": st.floats(max_value=-1e-9),
    "alpha": st.floats(max_value=-1e-9),
    "beta": st.floats(max_value=-1e-9) | st.sampled_from([math.inf, math.nan]),
    "gamma": st.floats(max_value=-1e-9) | st.sampled_from([math.inf, math.nan]),
    "negatives": _LETTERS.filter(lambda t: t not in ("global", "local")),
    "sync_bn": _LETTERS | st.integers(min_value=2),
    "report": _LETTERS | st.integers(min_value=2),
    "channels_last": _LETTERS | st.integers(min_value=2),
    "estimator": _LETTERS,
    "preset": _LETTERS,
    "encoder": _LETTERS,
    "precision": _LETTERS,
    "device": _LETTERS,
    "augment": _LETTERS,
    "on_bad_image": _LETTERS,
    "on_nonfinite": _LETTERS,
    "local_mi_kernel": _LETTERS,
    "deterministic": _LETTERS | st.integers(min_value=2),
    "compile": _LETTERS,
    "image_size": st.integers(max_value=0) | st.integers(min_value=33, max_value=10_000),
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), field=st.sampled_from(sorted(_INVALID)))
def test_invalid_values_are_rejected_naming_the_field(data: st.DataObject, field: str) -> None:
    value = data.draw(_INVALID[field])
    with pytest.raises(UsageError) as info:
        _load({field: value})
    assert str(info.value).startswith(f"{field}: "), str(info.value)


# ==== TOML output ====


def test_toml_values() -> None:
    assert toml_value(True) == "true"
    assert toml_value(3) == "3"
    assert toml_value(1e-4) == "0.0001"
    assert toml_value(float("inf")) == "inf"
    assert toml_value([1, "a"]) == '[1, "a"]'
    assert toml_value('a"b\\c\n\x7f') == '"a\\"b\\\\c\\u000a\\u007f"'
    for text in ['a"b\\c\n\x7f\t é', "", "\x00\x1f"]:
        assert tomllib.loads(f"k = {toml_value(text)}")["k"] == text
    with pytest.raises(TypeError):
        toml_value({"a": 1})


def test_print_config_round_trip(tmp_path: Path) -> None:
    s = _load({"batch_size": 8, "lr": 3e-5, "out": "runs/my run", "compile": True, "gamma": 0.0})
    text = to_toml(s)
    (tmp_path / "c.toml").write_text(text)
    back = _load(config=tmp_path / "c.toml")
    assert back.model_dump() == s.model_dump()


_PATHS = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=20,
).filter(lambda t: t.strip().lower() not in ("auto", "") and Path(t).as_posix() == t)


@settings(max_examples=60, deadline=None)
@given(
    batch_size=st.integers(2, 4096),
    lr=st.floats(1e-12, 10, allow_nan=False),
    beta1=st.floats(0, 0.999),
    epochs=st.none() | st.integers(1, 10**6),
    out=st.none() | _PATHS,
    resume=st.none() | _PATHS,
    channels_last=st.none() | st.booleans(),
    preset=st.sampled_from(["dim-l", "dim-g", "dim-lg"]),
)
def test_to_toml_parses_back_to_the_same_settings(**values: Any) -> None:
    s = _load(values)
    parsed = tomllib.loads(to_toml(s))
    back = TrainSettings(**parsed)
    assert back.model_dump() == s.model_dump()


def test_read_config_accepts_all_fields(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(to_toml(_load({"images": "data"})))
    assert read_config(config)["images"] == "data"


# ==== through the command line ====


def test_cli_print_config_prints_parseable_toml(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("seed = 9\nbatch_size = 16\n")
    result = CliRunner().invoke(
        app,
        ["train", "imgs", "--config", str(config), "--batch-size", "32", "--print-config"],
        env={"DIM_LR": "0.0005"},
    )
    assert result.exit_code == 0, result.output
    parsed = tomllib.loads(result.stdout)
    assert (parsed["seed"], parsed["batch_size"], parsed["lr"]) == (9, 32, 0.0005)
    assert parsed["images"] == "imgs"


def test_every_setting_is_a_cli_option() -> None:
    import typer.main

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    for name in FIELDS:
        if name == "images":
            continue  # the positional IMAGES argument
        assert f"--{name.replace('_', '-')}" in options, name


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--batch-size", "1"], "error: batch_size: must be at least 2 to have negatives, got 1"),
        (["--batch-size", "many"], "error: batch_size: input should be a valid integer"),
        (["--lr", "0"], "error: lr: must be a positive number such as 1e-4, got 0.0"),
        (["--estimator", "mine"], "error: estimator: input should be 'jsd', 'nce' or 'dv'"),
        (["--alpha", "0", "--beta", "0", "--gamma", "0"], "error: alpha, beta and gamma"),
        (["--quiet", "--verbose"], "error: --quiet and --verbose contradict each other"),
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(app, ["train", "imgs", *args, "--print-config"], env={})
    assert result.exit_code == 2
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
