"""Tests for dimcli/checkpoint.py: exact round trips, atomic replacement, damage and full disks."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dimcli import checkpoint
from dimcli.checkpoint import (
    CHECKPOINT_DIR,
    PREVIOUS_DIR,
    STRUCTURE_FILE,
    TEMP_DIR,
    TENSORS_FILE,
    capture_rng,
    flatten_state,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    unflatten_state,
)
from dimcli.errors import DimError


def _equal(a: Any, b: Any) -> bool:
    """Deep equality with exact tensor comparison (dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b  # NaN
    return type(a) is type(b) and a == b


def _nested_state() -> dict[str, Any]:
    return {
        "weights": {"layer.0.weight": torch.randn(3, 4), "layer.0.bias": torch.zeros(3)},
        "ints": {0: {"step": torch.tensor(5.0)}, 7: None},
        "tuple": (0.5, 0.999),
        "list": [1, "two", None, True, float("inf"), float("nan")],
        "dtypes": [
            torch.arange(4, dtype=torch.int64),
            torch.tensor([True, False]),
            torch.randn(2, dtype=torch.bfloat16),
            torch.randint(0, 255, (6,), dtype=torch.uint8),
        ],
        "__odd__": "a key that looks like a marker",
        "dotted": {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}},
    }


def test_flatten_round_trip_is_exact() -> None:
    state = _nested_state()
    tensors, structure = flatten_state(state)
    text = json.dumps(structure)  # the structure is plain JSON
    back = unflatten_state(json.loads(text), tensors)
    assert _equal(back, state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_flatten_rejects_objects_that_would_need_pickle() -> None:
    with pytest.raises(TypeError, match="cannot store object"):
        flatten_state({"x": object()})
    with pytest.raises(TypeError, match="keys must be str or int"):
        flatten_state({(1, 2): 3})


def test_save_load_round_trip(tmp_path: Path) -> None:
    state = _nested_state()
    folder = save_checkpoint(tmp_path, state)
    assert folder == tmp_path / CHECKPOINT_DIR
    assert sorted(p.name for p in folder.iterdir()) == sorted([TENSORS_FILE, STRUCTURE_FILE])
    json.loads((folder / STRUCTURE_FILE).read_text())  # JSON, not pickle
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.path == folder
    assert _equal(loaded.state, state)


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def _adam_pair() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.999))


def _adam_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def test_model_and_optimizer_resume_exactly(tmp_path: Path) -> None:
    model, opt = _adam_pair()
    for i in range(3):
        _adam_step(model, opt, i)
    save_checkpoint(tmp_path, {"model": model.state_dict(), "opt": opt.state_dict()})
    for i in range(3, 5):
        _adam_step(model, opt, i)

    model2, opt2 = _adam_pair()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    model2.load_state_dict(loaded.state["model"])
    opt2.load_state_dict(loaded.state["opt"])
    for i in range(3, 5):
        _adam_step(model2, opt2, i)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(tmp_path, {"rng": capture_rng()})
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    restore_rng(loaded.state["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


# ==== atomic replacement ====


def test_second_save_keeps_the_previous_one(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"n": 1})
    save_checkpoint(tmp_path, {"n": 2})
    assert (tmp_path / PREVIOUS_DIR).is_dir()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state["n"] == 2


def test_crash_halfway_through_writing_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, {"n": 1, "t": torch.ones(1000)})

    def half_then_crash(path: Path, data: bytes) -> None:
        path.write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(checkpoint, "_write_bytes", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"n": 2, "t": torch.zeros(1000)})
    assert (tmp_path / TEMP_DIR).is_dir()  # the half-written attempt is left behind
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state["n"] == 1
    assert torch.equal(loaded.state["t"], torch.ones(1000))

    monkeypatch.undo()
    save_checkpoint(tmp_path, {"n": 3})  # the leftover does not block the next save
    assert not (tmp_path / TEMP_DIR).exists()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state["n"] == 3


def test_crash_between_the_renames_falls_back_to_prev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, {"n": 1})
    real_replace = os.replace
    calls = []

    def replace_then_crash(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        if len(calls) == 2:  # checkpoint -> prev done; tmp -> checkpoint never happens
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"n": 2})
    monkeypatch.undo()
    assert not (tmp_path / CHECKPOINT_DIR).exists()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.path.name == PREVIOUS_DIR and loaded.state["n"] == 1


def test_damaged_checkpoint_falls_back_then_fails_clearly(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"t": torch.arange(100)})
    save_checkpoint(tmp_path, {"t": torch.arange(200)})
    tensors = tmp_path / CHECKPOINT_DIR / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:50])
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.path.name == PREVIOUS_DIR
    assert torch.equal(loaded.state["t"], torch.arange(100))

    (tmp_path / PREVIOUS_DIR / STRUCTURE_FILE).write_text("{not json")
    with pytest.raises(DimError, match="no intact checkpoint in .*does not match its checksum"):
        load_checkpoint(tmp_path)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path, {"n": 1})
    header = json.loads((folder / STRUCTURE_FILE).read_text())
    header["format_version"] = 99
    (folder / STRUCTURE_FILE).write_text(json.dumps(header))
    with pytest.raises(DimError, match="newer dimcli"):
        load_checkpoint(tmp_path)


# ==== disk errors ====


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, {"n": 1})

    def no_space(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "_write_bytes", no_space)
    with pytest.raises(DimError) as info:
        save_checkpoint(tmp_path, {"n": 2})
    assert str(info.value) == (
        f"no space left on device while saving the checkpoint to {tmp_path / CHECKPOINT_DIR}; "
        f"free space and resume with: dim train --resume {tmp_path}"
    )
    assert not (tmp_path / TEMP_DIR).exists()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state["n"] == 1


def test_other_os_errors_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: Path, data: bytes) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "_write_bytes", denied)
    with pytest.raises(DimError, match="could not save the checkpoint to .*: Permission denied"):
        save_checkpoint(tmp_path, {"n": 1})
