"""Training settings: one pydantic model, filled from four layers.

Precedence, highest first:

1. command-line options (`dim train --batch-size 128`), or keyword arguments in Python;
2. environment variables `DIM_<FIELD>` in upper case (`DIM_BATCH_SIZE=128`);
3. a TOML config file (`--config run.toml`, or the `DIM_CONFIG` variable) with flat keys
   named like the fields (`batch_size = 128`; dashes are accepted too: `batch-size = 128`);
4. the defaults of `TrainSettings`.

A layer only supplies the keys it names, so `--config` can set a few fields and the
environment can override one of them. Unknown config keys are rejected with the nearest valid
key; so are unknown `DIM_*` variables that look like a misspelt field (others are left alone,
they may belong to another tool). Every field takes "auto" where its default is automatic.

`settings.model_fields_set` records which fields some layer set explicitly; `--resume` uses it
to tell options the user gave from defaults.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from dimcli.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENV_PREFIX = "DIM_"
CONFIG_ENV = "DIM_CONFIG"
DEFAULT_EPOCHS = 10
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class TrainSettings(BaseModel):
    """Everything `dim train` can be told; each field is the option `--<field-with-dashes>`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # ---- data ----
    images: Path | None = None
    """Folder of training images (searched recursively)."""
    augment: Literal["auto", "none", "flip", "crop-flip"] = "auto"
    """Augmentation; auto = none at 32 pixels or less (paper, CIFAR), crop-flip above (STL-10)."""
    on_bad_image: Literal["skip", "fail"] = "skip"
    """What to do with an image that cannot be decoded."""
    workers: int | None = None
    """Data-loading processes; None (auto) picks from the CPU count."""

    # ---- model and objective ----
    encoder: str = "conv32"
    image_size: int | None = None
    """Input size in pixels; None (auto) = the encoder's own."""
    feature_dim: int = 64
    mi_units: int = 2048
    estimator: Literal["jsd", "nce", "dv"] = "jsd"
    preset: Literal["dim-l", "dim-g", "dim-lg"] = "dim-l"
    alpha: float | None = None
    """Weight of the global MI term; None = the preset's."""
    beta: float | None = None
    """Weight of the local MI term; None = the preset's."""
    gamma: float | None = None
    """Weight of the prior-matching term; None = the preset's."""
    local_mi_kernel: Literal["auto", "fused", "reference"] = "auto"

    # ---- optimisation ----
    epochs: int | None = None
    """Epochs to train; None = DEFAULT_EPOCHS unless max_steps is set."""
    max_steps: int | None = None
    """Stop after this many steps in all (whichever of epochs/max_steps comes first)."""
    batch_size: int = 64
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    disc_lr: float | None = None
    """Learning rate of the prior discriminator; None = lr."""
    gp_weight: float = 0.0
    seed: int = 0
    deterministic: bool = False

    # ---- hardware ----
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    """Channels-last memory format for convolutions; None (auto) decides per device."""
    compile: bool = False
    negatives: Literal["global", "local"] = "global"
    """Multi-process runs: score against the whole global batch, or each process's own share."""
    sync_bn: bool = False
    """Multi-process runs on CUDA: BatchNorm statistics over the global batch."""

    # ---- run folder ----
    out: Path | None = None
    """Run folder; None = runs/<YYYYmmdd-HHMMSS>."""
    resume: str | None = None
    """"latest" or a run folder to continue."""
    save_every: int = 1000
    log_every: int = 50
    on_nonfinite: Literal["fail", "skip"] = "fail"
    report: bool = False

    # ---- validation ----

    @model_validator(mode="before")
    @classmethod
    def _auto_means_none(cls, data: Any) -> Any:
        # "auto" (any case) or an empty string selects the automatic default of optional fields.
        if isinstance(data, dict):
            data = dict(data)
            for key, value in data.items():
                if (
                    key in _OPTIONAL_FIELDS
                    and isinstance(value, str)
                    and value.strip().lower() in ("auto", "")
                ):
                    data[key] = None
        return data

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"must be at least 2 to have negatives, got {v}")
        return v

    @field_validator("epochs", "max_steps", "save_every", "log_every", "feature_dim", "mi_units")
    @classmethod
    def _positive_int(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive number of pixels, got {v}")
        return v

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError(f"must be 0 (load in the main process) or more, got {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < 2**63:
            raise ValueError(f"must be between 0 and 2**63 - 1, got {v}")
        return v

    @field_validator("lr", "disc_lr")
    @classmethod
    def _learning_rate(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"must be a positive number such as 1e-4, got {v}")
        return v

    @field_validator("beta1", "beta2")
    @classmethod
    def _adam_beta(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    @field_validator("alpha", "beta", "gamma", "gp_weight")
    @classmethod
    def _weight(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"must be a finite number >= 0, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if not _DEVICE_PATTERN.match(v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, v: str) -> str:
        from dimcli.models import ENCODERS

        if v not in ENCODERS:
            raise ValueError(f"unknown encoder {v!r}{_did_you_mean(v, list(ENCODERS))}")
        return v

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str | None) -> str | None:
        if v is not None and v.strip().lower() == "latest":
            return "latest"
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        from dimcli.models import check_image_size

        if self.image_size is not None:
            try:
                check_image_size(self.encoder, self.image_size)
            except UsageError as err:
                raise ValueError(f"image_size: {err}") from None
        if not any(w > 0 for w in self.weights()):
            raise ValueError(
                "alpha, beta and gamma are all zero, so there is nothing to train; "
                "set at least one of them above zero or leave them to the --preset"
            )
        return self

    # ---- derived values ----

    def weights(self) -> tuple[float, float, float]:
        """(alpha, beta, gamma): the preset's, with any explicit override applied."""
        from dimcli.models import PRESETS

        alpha, beta, gamma = PRESETS[self.preset]
        return (
            alpha if self.alpha is None else self.alpha,
            beta if self.beta is None else self.beta,
            gamma if self.gamma is None else self.gamma,
        )

    def resolved_image_size(self) -> int:
        """The input size: explicit, or the encoder's default."""
        from dimcli.models import default_image_size

        return self.image_size if self.image_size is not None else default_image_size(self.encoder)

    def resolved_augment(self) -> str:
        """The augmentation: explicit, or the paper's choice for the input size."""
        if self.augment != "auto":
            return self.augment
        return "none" if self.resolved_image_size() <= 32 else "crop-flip"

    def resolved_epochs(self) -> int | None:
        """Epochs to run: explicit; unbounded (None) when only max_steps is set; else default."""
        if self.epochs is not None:
            return self.epochs
        return None if self.max_steps is not None else DEFAULT_EPOCHS


FIELDS: tuple[str, ...] = tuple(TrainSettings.model_fields)
_OPTIONAL_FIELDS = frozenset(
    name for name, info in TrainSettings.model_fields.items() if info.default is None
)


# ---- loading ----


def load_settings(
    cli: Mapping[str, Any] | None = None,
    *,
    config: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> TrainSettings:
    """Merge defaults < config file < environment < `cli` into validated settings.

    Args:
        cli: explicitly given options by field name; None values count as "not given".
        config: a TOML file; defaults to `$DIM_CONFIG` when that is set.
        environ: the environment (default `os.environ`).

    Raises:
        UsageError: an unreadable or invalid config file, an unknown key, or a bad value; the
            message names the field, where the value came from, and the problem.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}

    config_path = config if config is not None else env.get(CONFIG_ENV) or None
    if config_path is not None:
        for key, value in read_config(Path(config_path)).items():
            merged[key] = value
            sources[key] = str(config_path)

    for key, value in _env_layer(env).items():
        merged[key] = value
        sources[key] = ENV_PREFIX + key.upper()

    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key not in FIELDS:
            raise UsageError(f"unknown setting {key!r}{_did_you_mean(key, list(FIELDS))}")
        merged[key] = value
        sources[key] = "--" + key.replace("_", "-")

    return validate_settings(merged, sources)


def validate_settings(
    values: Mapping[str, Any], sources: Mapping[str, str] | None = None
) -> TrainSettings:
    """Build `TrainSettings`, turning a ValidationError into one UsageError line per problem."""
    try:
        return TrainSettings(**values)
    except ValidationError as err:
        raise UsageError(describe_validation_error(err, sources or {})) from None


def describe_validation_error(err: ValidationError, sources: Mapping[str, str]) -> str:
    """One line naming each bad field, the problem, and where the value came from."""
    parts = []
    for problem in err.errors(include_url=False):
        loc = [str(p) for p in problem.get("loc", ())]
        field = loc[0] if loc else ""
        msg = str(problem.get("msg", "invalid value"))
        kind = str(problem.get("type", ""))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif kind == "extra_forbidden":
            msg = f"unknown setting{_did_you_mean(field, list(FIELDS))}"
        else:
            msg = f"{msg[:1].lower()}{msg[1:]}, got {problem.get('input')!r}"
        where = f" (from {sources[field]})" if field in sources else ""
        if not field and msg.startswith("image_size: "):
            field, msg = "image_size", msg[len("image_size: ") :]
            where = f" (from {sources['image_size']})" if "image_size" in sources else ""
        parts.append(f"{field}: {msg}{where}" if field else msg)
    return "; ".join(parts)


def read_config(path: Path) -> dict[str, Any]:
    """Read a flat TOML config file into field names (dashes become underscores).

    Raises:
        UsageError: missing file, invalid TOML, a table where a value belongs, or an unknown
            key (with the nearest valid key).
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}; check the --config path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read config file {path}: {err}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path} is not valid TOML ({err}); fix the syntax") from None

    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UsageError(
                f"unknown key {key!r} in config file {path}{_did_you_mean(name, list(FIELDS))}"
            )
        if isinstance(value, dict):
            raise UsageError(
                f"config key {key!r} in {path} is a table; the file takes flat keys "
                f"such as `batch_size = 64`"
            )
        out[name] = value
    return out


def _env_layer(env: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name in FIELDS:
            out[name] = value
            continue
        close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.8)
        if close:
            raise UsageError(
                f"unknown environment variable {var}; did you mean {ENV_PREFIX}{close[0].upper()}? "
                f"rename or unset it"
            )
    return out


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid names: {', '.join(choices)}"


# ---- TOML output ----


def to_toml(settings: TrainSettings) -> str:
    """The settings as a flat TOML document; automatic (None) values are commented out.

    `tomllib.loads(to_toml(s))` read back with `load_settings(config=...)` gives `s` again.
    """
    lines = ["# dimcli train settings (DIM_<FIELD> variables and options override these)"]
    for name in FIELDS:
        value = getattr(settings, name)
        if value is None:
            lines.append(f"# {name}: not set (automatic default)")
        else:
            lines.append(f"{name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """A TOML literal for a scalar (str, Path, bool, int, float) or a flat list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form: 0.0001, 1e-05, 2.0
    if isinstance(value, (str, Path)):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")  # TOML forbids raw control characters in strings
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
