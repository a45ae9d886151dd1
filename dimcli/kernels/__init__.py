"""Fused GPU kernels (Triton) for the Deep InfoMax objectives.

`fused_local_mi` computes the same loss and estimate as the reference path in
`dimcli.objectives` without ever storing the (N, N, HW) score tensor; see docs/fused-kernel.md.
It runs natively on CUDA tensors and under Triton's interpreter on CPU tensors (slow; meant for
tests). Importing this package does not import Triton.
"""

from __future__ import annotations

import functools
import importlib

from torch import Tensor

__all__ = ["fused_local_mi", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (never raises)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:
        return False
    return True


def fused_local_mi(
    local: Tensor, global_: Tensor, estimator: str, *, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """Local-MI (loss, estimate) by the fused Triton kernels; differentiable in both inputs.

    Args:
        local: local features, (N, D, H, W); float32, bfloat16 or float16 (other float dtypes
            are computed in float32).
        global_: global features, (N, D).
        estimator: "jsd", "nce" or "dv" (formulas in `dimcli.objectives`).
        chunk: columns of the N*HW axis per backward chunk; the backward keeps an (N, chunk)
            gradient buffer. Default: 2^24 / N.

    Returns:
        (loss, estimate), 0-dim float32 tensors on the input device. Gradients reach `local`
        and `global_` in their own dtypes.

    Raises:
        ValueError: a batch of fewer than 2, an unknown estimator, mismatched shapes or devices.
        RuntimeError: Triton is not installed.
    """
    from dimcli.kernels.fused_mi import check_inputs

    check_inputs(local, global_, estimator)
    if not triton_available():
        raise RuntimeError(
            "the fused local-MI kernel needs Triton, which is not installed; "
            "install triton or use kernel='reference'"
        )
    from dimcli.kernels.fused_mi import fused_local_mi as _fused

    return _fused(local, global_, estimator, chunk=chunk)
