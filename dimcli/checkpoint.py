"""Resume state of a training run: tensors in safetensors, everything else in JSON, no pickle.

A checkpoint is a folder with two files:

    state.safetensors   every tensor of the state (model and optimiser tensors, RNG states)
    state.json          the state's structure with tensors replaced by references, plus the
                        SHA-256 of state.safetensors so a damaged pair is never loaded

Nested dicts, lists and tuples of tensors and JSON scalars round-trip exactly, including the
integer keys of an optimiser's `state_dict()`.

Writing is atomic: both files go into `checkpoint.tmp/` and are fsynced; then the current
`checkpoint/` becomes `checkpoint.prev/` and `checkpoint.tmp/` becomes `checkpoint/`. A crash
at any point leaves at least one complete checkpoint: the loader takes `checkpoint/` and falls
back to `checkpoint.prev/` when the first is missing or damaged. `checkpoint.tmp/` is never
trusted. The previous checkpoint is kept until the next save, so a run folder holds two.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from dimcli.errors import DimError

FORMAT = "dimcli.checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
PREVIOUS_DIR = "checkpoint.prev"
TEMP_DIR = "checkpoint.tmp"
TENSORS_FILE = "state.safetensors"
STRUCTURE_FILE = "state.json"

# Markers in the JSON structure; a dict whose keys could clash with them is stored as pairs.
_TENSOR, _TUPLE, _PAIRS = "__tensor__", "__tuple__", "__pairs__"


# ---- (un)flattening ----


def flatten_state(state: Any) -> tuple[dict[str, Tensor], Any]:
    """Split a nested state into named tensors and a JSON-able structure that refers to them.

    Raises:
        TypeError: a leaf that is neither a tensor nor a JSON scalar.
    """
    tensors: dict[str, Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, Tensor):
            name = path or "tensor"
            if name in tensors:  # a key with dots could collide with a nested path
                name = f"{name}#{len(tensors)}"
            tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: name}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
            if plain:
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            for k in obj:
                if not isinstance(k, (str, int)):
                    raise TypeError(f"checkpoint dict keys must be str or int, got {k!r} at {path}")
            return {
                _PAIRS: [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in obj.items()]
            }
        raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (at {path or 'root'})")

    return tensors, walk(state, "")


def unflatten_state(structure: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(structure, list):
        return [unflatten_state(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if _TENSOR in structure:
            return tensors[structure[_TENSOR]]
        if _TUPLE in structure:
            return tuple(unflatten_state(v, tensors) for v in structure[_TUPLE])
        if _PAIRS in structure:
            return {k: unflatten_state(v, tensors) for k, v in structure[_PAIRS]}
        return {k: unflatten_state(v, tensors) for k, v in structure.items()}
    return structure


# ---- RNG state ----


def capture_rng() -> dict[str, Any]:
    """The state of every random generator training uses (torch CPU/CUDA/MPS, NumPy, Python)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if sys.platform == "darwin" and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `capture_rng` returned (after a round trip through a checkpoint)."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            npst["kind"],
            keys,
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [t.to(torch.uint8) for t in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if "mps" in state and sys.platform == "darwin" and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"].to(torch.uint8))


# ---- saving ----


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a file and fsync it (tests replace this to simulate a full disk or a crash)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically replace the checkpoint of `run_dir` with `state`; returns the checkpoint folder.

    Raises:
        DimError: the disk is full, or another OS error while writing; the previous
            checkpoint is left intact either way.
    """
    run_dir = Path(run_dir)
    final, prev, tmp = run_dir / CHECKPOINT_DIR, run_dir / PREVIOUS_DIR, run_dir / TEMP_DIR
    tensors, structure = flatten_state(state)
    try:
        blob = save_tensors(tensors)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
            "structure": structure,
        }
        text = json.dumps(header).encode("utf-8")

        # ---- write the new pair beside the current one ----
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a crash while writing; never trusted
        tmp.mkdir(parents=True)
        _write_bytes(tmp / TENSORS_FILE, blob)
        _write_bytes(tmp / STRUCTURE_FILE, text)
        _fsync_dir(tmp)

        # ---- swap: current -> prev, tmp -> current ----
        if final.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(final, prev)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DimError(
                f"no space left on device while saving the checkpoint to {final}; "
                f"free space and resume with: dim train --resume {run_dir}"
            ) from None
        raise DimError(
            f"could not save the checkpoint to {final}: {err.strerror or err}; "
            f"fix the problem and resume with: dim train --resume {run_dir}"
        ) from None
    return final


# ---- loading ----


@dataclass
class Checkpoint:
    """A loaded checkpoint: the state as saved, and the folder it came from."""

    state: dict[str, Any]
    path: Path


class _Damaged(Exception):
    pass


def checkpoint_exists(run_dir: Path) -> bool:
    """Whether `run_dir` holds a checkpoint folder (complete or not)."""
    return any((Path(run_dir) / name).is_dir() for name in (CHECKPOINT_DIR, PREVIOUS_DIR))


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """Load the newest complete checkpoint of `run_dir`, tensors on the CPU; None if there is none.

    Tries `checkpoint/` then `checkpoint.prev/` (what is left if a save was cut short).

    Raises:
        DimError: checkpoint folders exist but none is complete and intact.
    """
    problems = []
    for name in (CHECKPOINT_DIR, PREVIOUS_DIR):
        folder = Path(run_dir) / name
        if not folder.is_dir():
            continue
        try:
            return Checkpoint(state=_read(folder), path=folder)
        except _Damaged as err:
            problems.append(f"{folder}: {err}")
    if problems:
        raise DimError(
            f"no intact checkpoint in {run_dir} ({'; '.join(problems)}); "
            "start a new run with another --out"
        )
    return None


def _read(folder: Path) -> dict[str, Any]:
    try:
        header = json.loads((folder / STRUCTURE_FILE).read_bytes())
        blob = (folder / TENSORS_FILE).read_bytes()
    except FileNotFoundError as err:
        raise _Damaged(f"{Path(err.filename or '').name} is missing") from None
    except (OSError, ValueError) as err:
        raise _Damaged(f"unreadable ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _Damaged(f"{STRUCTURE_FILE} is not a dimcli checkpoint")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise _Damaged(
            f"written by a newer dimcli (format {header.get('format_version')}); upgrade dimcli"
        )
    if hashlib.sha256(blob).hexdigest() != header.get("tensors_sha256"):
        raise _Damaged(f"{TENSORS_FILE} does not match its checksum (partly written)")
    try:
        tensors = load_tensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise _Damaged(f"{TENSORS_FILE} is damaged ({err})") from None
    try:
        state = unflatten_state(header["structure"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise _Damaged(f"structure refers to a missing tensor ({err})") from None
    if not isinstance(state, dict):
        raise _Damaged("the state is not a mapping")
    return state
