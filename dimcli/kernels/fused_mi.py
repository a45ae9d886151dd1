"""Fused local-MI objective: the score tensor is never stored.

The reference path builds s[i, j, k] = <g_i, l_{j,k}>, an (N, N, HW) tensor, and reduces it.
Here the local map is viewed as a matrix lt (R, D) with R = N*HW (row r = j*HW + k) and the
Triton kernels of `_mi_kernels` compute the scores s = g . lt^T tile by tile:

- forward: each tile is reduced on the fly to per-row statistics (the positive scores, and per
  row either the sum of sp(s) over negatives (JSD) or their log-sum-exp (NCE, DV)); partial
  statistics of column splits are combined here in torch;
- backward: the tiles are recomputed from g, lt and the saved statistics, turned into the
  gradient dS = d loss / d s, written to an (N, chunk) buffer, and multiplied out:
  dg += dS . lt[chunk] and dlt[chunk] = dS^T . g.

Memory beyond the inputs and their gradients: O(N*HW) statistics, an (N, D) float32
accumulator, the (N, chunk) dS buffer (at most `_DS_BUDGET` elements by default) and, when the
local map is not channels-last in memory, one (N*HW, D) copy of it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

ESTIMATORS = ("jsd", "nce", "dv")

# Default size (elements) of the backward dS buffer: 2^24 is 32 MiB in bf16, 64 MiB in fp32.
_DS_BUDGET = 1 << 24
_KERNEL_MODULE = "dimcli.kernels._mi_kernels"
_INTERPRETED_MODULE = "dimcli.kernels._mi_kernels_interpreted"
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_modules: dict[bool, ModuleType] = {}


# ==== kernel selection ====


def _kernels(interpret: bool) -> ModuleType:
    """The kernel module compiled for the GPU, or a private copy run by Triton's interpreter.

    Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function (knobs.runtime in
    Triton 3.x), i.e. when the kernel module is imported. Loading a second copy with the
    interpreter switched on lets CPU tensors use the same kernels without changing how the
    ordinary import behaves for CUDA tensors.
    """
    # Limitation: the interpreter is orders of magnitude slower than the reference path on the
    # CPU; it exists for tests. See docs/limitations.md
    if interpret not in _modules:
        if interpret:
            _modules[interpret] = _load_interpreted_copy()
        else:
            _modules[interpret] = importlib.import_module(_KERNEL_MODULE)
    return _modules[interpret]


def _load_interpreted_copy() -> ModuleType:
    import triton

    spec = importlib.util.find_spec(_KERNEL_MODULE)
    assert spec is not None and spec.origin is not None, "kernel module must be importable"
    copy_spec = importlib.util.spec_from_file_location(_INTERPRETED_MODULE, spec.origin)
    assert copy_spec is not None and copy_spec.loader is not None, "kernel source must load"
    module = importlib.util.module_from_spec(copy_spec)
    sys.modules[_INTERPRETED_MODULE] = module

    knobs = getattr(triton, "knobs", None)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # what Triton < 3.4 reads at decoration time
    try:
        if knobs is not None:
            with knobs.runtime.scope():
                knobs.runtime.interpret = True
                copy_spec.loader.exec_module(module)
        else:
            copy_spec.loader.exec_module(module)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


@dataclass(frozen=True)
class _Tiles:
    """Block sizes and launch options for one device and dtype."""

    block_i: int  # rows of g per score tile
    block_r: int  # columns (local rows) per score tile
    block_k: int  # reduction step of every GEMM (D in the score tiles, R or N in the gradients)
    block_d: int  # D columns per gradient tile
    num_warps: int
    num_stages: int


# The interpreter executes every op in numpy: the smallest tiles tl.dot accepts are fastest.
_INTERPRETER_TILES = _Tiles(16, 16, 16, 16, 1, 1)


def _tiles(device: torch.device, dtype: torch.dtype, n: int) -> _Tiles:
    if device.type != "cuda":
        return _INTERPRETER_TILES
    # Limitation: fixed tile sizes chosen for Hopper/Ampere, not autotuned; see
    # docs/limitations.md
    # 128x128 output tiles, a K step of 64 (32 for float32: same bytes per stage). Three
    # pipeline stages take 96 KiB of shared memory; Hopper has room for a fourth.
    block_k = 32 if dtype == torch.float32 else 64
    block_i = 64 if n <= 64 else 128
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    stages = 4 if hopper and dtype != torch.float32 else 3
    return _Tiles(block_i, 128, block_k, 128, 8, stages)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# DOT_MODE values understood by `_mi_kernels._dot`.
_DOT_DEFAULT, _DOT_IEEE, _DOT_UPCAST = 0, 1, 2


def _dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    if device.type != "cuda":
        # The interpreter multiplies in numpy: float32 products, bfloat16 upcast first.
        return _DOT_UPCAST if dtype == torch.bfloat16 else _DOT_IEEE
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        # Follow torch's matmul setting so float32 results match the reference path.
        return _DOT_IEEE
    return _DOT_DEFAULT


# Kernels (by id) that ran out of shared memory with the preferred number of stages.
_two_stage: set[int] = set()


def _launch(kernel: Any, grid: tuple[int, ...], tiles: _Tiles, *args: Any, **kwargs: Any) -> None:
    stages = 2 if id(kernel) in _two_stage else tiles.num_stages
    try:
        kernel[grid](*args, **kwargs, num_warps=tiles.num_warps, num_stages=stages)
    except Exception as err:
        # A GPU with less shared memory than the stages need: fall back to two stages.
        if type(err).__name__ != "OutOfResources" or stages <= 2:
            raise
        _two_stage.add(id(kernel))
        kernel[grid](*args, **kwargs, num_warps=tiles.num_warps, num_stages=2)


# ==== autograd ====


class _FusedLocalMI(torch.autograd.Function):
    """(lt (R, D), g (N, D)) -> (loss, estimate), both 0-dim float32."""

    @staticmethod
    def forward(
        ctx: Any,
        lt: Tensor,
        g: Tensor,
        hw: int,
        estimator: str,
        chunk: int | None,
    ) -> tuple[Tensor, Tensor]:
        n, d = g.shape
        r = lt.shape[0]
        interpret = lt.device.type != "cuda"
        kernels = _kernels(interpret)
        tiles = _tiles(lt.device, lt.dtype, n)

        # ==== split the columns so the grid fills the device ====
        n_tiles = _cdiv(r, tiles.block_r)
        row_blocks = _cdiv(n, tiles.block_i)
        if interpret:
            wanted = _cdiv(n_tiles, 2)  # two tiles per program exercises the running statistics
        else:
            sms = torch.cuda.get_device_properties(lt.device).multi_processor_count
            wanted = _cdiv(4 * sms, row_blocks)
        tiles_per_split = _cdiv(n_tiles, max(1, min(wanted, n_tiles)))
        splits = _cdiv(n_tiles, tiles_per_split)

        # ==== scores -> positives (R,) and partial row statistics (N, splits) ====
        pos = torch.empty(r, device=lt.device, dtype=torch.float32)
        stat = torch.empty(n, splits, device=lt.device, dtype=torch.float32)
        _launch(
            kernels.mi_forward_kernel,
            (row_blocks, splits),
            tiles,
            g,
            lt,
            pos,
            stat,
            n,
            r,
            d,
            hw,
            tiles_per_split,
            g.stride(0),
            g.stride(1),
            lt.stride(0),
            lt.stride(1),
            stat.stride(0),
            IS_JSD=estimator == "jsd",
            DOT_MODE=_dot_mode(lt.dtype, lt.device),
            BLOCK_I=tiles.block_i,
            BLOCK_R=tiles.block_r,
            BLOCK_D=tiles.block_k,
        )

        # ==== combine the statistics into the loss ====
        n_pos = n * hw
        n_neg = n * (n - 1) * hw
        pos_nk = pos.view(n, hw)  # (N*HW,) -> (N, HW): pos[i, k] = s[i, i, k]
        if estimator == "jsd":
            row = torch.empty(0, device=lt.device)
            loss = F.softplus(-pos).sum() / n_pos + stat.sum() / n_neg
            estimate = 2.0 * math.log(2.0) - loss
        elif estimator == "nce":
            row = torch.logsumexp(stat, dim=1)  # (N,) log sum_{j!=i,k'} e^{s[i,j,k']}
            # -s + log(e^s + e^lse) = sp(lse - s)
            loss = F.softplus(row[:, None] - pos_nk).mean()
            estimate = math.log(1.0 + (n - 1) * hw) - loss
        else:
            row = torch.logsumexp(stat.flatten(), dim=0)  # () log sum over all negatives
            loss = -pos.mean() + row - math.log(n_neg)
            estimate = -loss

        ctx.save_for_backward(lt, g, pos, row)
        ctx.hw = hw
        ctx.estimator = estimator
        ctx.chunk = chunk
        return loss, estimate

    @staticmethod
    @once_differentiable  # Limitation: no double backward; see docs/limitations.md
    def backward(ctx: Any, grad_loss: Tensor, grad_estimate: Tensor) -> tuple[Any, ...]:
        lt, g, pos, row = ctx.saved_tensors
        hw: int = ctx.hw
        estimator: str = ctx.estimator
        n, d = g.shape
        r = lt.shape[0]
        n_pos = n * hw
        n_neg = n * (n - 1) * hw
        need_lt, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        interpret = lt.device.type != "cuda"
        kernels = _kernels(interpret)
        tiles = _tiles(lt.device, lt.dtype, n)
        dot_mode = _dot_mode(lt.dtype, lt.device)

        # Every estimate is (constant - loss), so one scalar carries both upstream gradients.
        upstream = grad_loss.float() - grad_estimate.float()

        # ==== per-column and per-row factors of dS, scaled to O(1) for 16-bit storage ====
        # dS = (upstream / scale) * dS', with dS' as written by mi_dscore_kernel.
        ones = torch.ones(n, device=lt.device, dtype=torch.float32)
        if estimator == "jsd":
            # d/ds: -sigmoid(-s)/n_pos on positives, sigmoid(s)/n_neg on negatives.
            scale = float(n_neg)
            dpos = -torch.sigmoid(-pos) * (n_neg / n_pos)
            coef, shift = ones, ones
        elif estimator == "nce":
            # loss = mean_{i,k} sp(lse_i - s_iik). Positives: -sigmoid(lse_i - s_iik)/n_pos.
            # Negatives: a_i * e^{s - lse_i}, a_i = sum_k sigmoid(lse_i - s_iik) / n_pos.
            scale = float(n_pos)
            weight = torch.sigmoid(row[:, None] - pos.view(n, hw))  # (N, HW)
            dpos = -weight.reshape(r)
            coef, shift = weight.sum(dim=1), row
        else:
            # loss = -mean s_pos + LSE_neg - log n_neg. Positives: -1/n_pos.
            # Negatives: e^{s - LSE_neg} (softmax over every negative of the batch).
            scale = float(min(n_pos, 4096))  # keeps scale * e^{s - LSE} <= 4096 (fp16-safe)
            dpos = torch.full((r,), -scale / n_pos, device=lt.device, dtype=torch.float32)
            coef, shift = ones * scale, row.expand(n).contiguous()
        factor = (upstream / scale).reshape(1).contiguous()

        # ==== column chunks: recompute scores -> dS' -> GEMMs ====
        cols = ctx.chunk if ctx.chunk is not None else max(1, _DS_BUDGET // n)
        cols = min(
            _cdiv(max(cols, 1), tiles.block_r) * tiles.block_r,
            _cdiv(r, tiles.block_r) * tiles.block_r,
        )
        ds = torch.empty(n, cols, device=lt.device, dtype=lt.dtype)
        dg_acc = torch.zeros(n, d, device=lt.device, dtype=torch.float32) if need_g else None
        dlt = torch.empty(r, d, device=lt.device, dtype=lt.dtype) if need_lt else None
        for col0 in range(0, r, cols):
            width = min(cols, r - col0)
            _launch(
                kernels.mi_dscore_kernel,
                (_cdiv(n, tiles.block_i), _cdiv(width, tiles.block_r)),
                tiles,
                g,
                lt,
                dpos,
                coef,
                shift,
                ds,
                n,
                r,
                d,
                hw,
                col0,
                width,
                g.stride(0),
                g.stride(1),
                lt.stride(0),
                lt.stride(1),
                ds.stride(0),
                IS_JSD=estimator == "jsd",
                DOT_MODE=dot_mode,
                BLOCK_I=tiles.block_i,
                BLOCK_R=tiles.block_r,
                BLOCK_D=tiles.block_k,
            )
            if dg_acc is not None:
                _launch(
                    kernels.mi_grad_global_kernel,
                    (_cdiv(n, tiles.block_i), _cdiv(d, tiles.block_d)),
                    tiles,
                    ds,
                    lt,
                    dg_acc,
                    n,
                    width,
                    col0,
                    d,
                    ds.stride(0),
                    lt.stride(0),
                    lt.stride(1),
                    dg_acc.stride(0),
                    DOT_MODE=dot_mode,
                    BLOCK_I=tiles.block_i,
                    BLOCK_D=tiles.block_d,
                    BLOCK_C=tiles.block_k,
                )
            if dlt is not None:
                _launch(
                    kernels.mi_grad_local_kernel,
                    (_cdiv(width, tiles.block_r), _cdiv(d, tiles.block_d)),
                    tiles,
                    ds,
                    g,
                    dlt,
                    factor,
                    n,
                    width,
                    col0,
                    d,
                    ds.stride(0),
                    g.stride(0),
                    g.stride(1),
                    dlt.stride(0),
                    dlt.stride(1),
                    DOT_MODE=dot_mode,
                    BLOCK_C=tiles.block_r,
                    BLOCK_D=tiles.block_d,
                    BLOCK_I=tiles.block_k,
                )
        dg = (dg_acc * factor).to(g.dtype) if dg_acc is not None else None
        return dlt, dg, None, None, None


# ==== public entry ====


def check_inputs(local: Tensor, global_: Tensor, estimator: str) -> None:
    """Raise ValueError for inputs the fused path cannot score."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if local.dim() != 4 or global_.dim() != 2:
        raise ValueError(
            f"local must be (N, D, H, W) and global_ (N, D), "
            f"got {tuple(local.shape)} and {tuple(global_.shape)}"
        )
    n, d, _, _ = local.shape
    if global_.shape != (n, d):
        raise ValueError(
            f"local {tuple(local.shape)} and global_ {tuple(global_.shape)} disagree on N or D"
        )
    if n < 2:
        raise ValueError(f"batch size must be at least 2 to have negatives, got {n}")
    if local.device != global_.device:
        raise ValueError(
            f"local and global_ must be on one device, got {local.device} and {global_.device}"
        )


# Kernel launches and module loading are opaque to torch.compile: run them eagerly.
@torch.compiler.disable
def fused_local_mi(
    local: Tensor, global_: Tensor, estimator: str, *, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """Local-MI loss and estimate by the fused Triton kernels (see `dimcli.kernels`)."""
    check_inputs(local, global_, estimator)
    n, d, h, w = local.shape

    # Compute in one of the dtypes the kernels take; autograd casts the gradients back.
    dtype = torch.promote_types(local.dtype, global_.dtype)
    if dtype not in _SUPPORTED_DTYPES:
        dtype = torch.float32
    # (N, D, H, W) -> (N, H, W, D) -> (N*HW, D): a view when the map is channels-last in
    # memory, otherwise one copy of the map, kept until backward.
    # Limitation: an NCHW-contiguous local map costs one copy; see docs/limitations.md
    lt = local.to(dtype).permute(0, 2, 3, 1).reshape(n * h * w, d)
    g = global_.to(dtype)
    loss, estimate = _FusedLocalMI.apply(lt, g, h * w, estimator, chunk)
    return loss, estimate
