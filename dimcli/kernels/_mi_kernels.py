"""Triton kernels of the fused local-MI objective (launched from `dimcli.kernels.fused_mi`).

This module holds only `@triton.jit` functions. Triton decides at decoration time whether a
kernel is compiled for the GPU or run by its interpreter (TRITON_INTERPRET=1), so `fused_mi`
may import this file twice: once as is, for CUDA tensors, and once as a private copy with the
interpreter switched on, for CPU tensors.

Notation shared by every kernel:

    g   (N, D)   global vectors, row i
    lt  (R, D)   local vectors, R = N*HW, row r = j*HW + k (image j, location k)
    s[i, r] = <g[i], lt[r]>      a positive pair when r // HW == i, a negative otherwise

Scores exist only as (BLOCK_I, BLOCK_R) tiles in registers. The forward pass reduces each tile
to per-row statistics; the backward pass recomputes the tiles and turns them into gradient
tiles dS, written to a bounded (N, chunk) buffer that two GEMM kernels consume.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


# Reductions go through tl.reduce rather than tl.sum / tl.max: those are @triton.jit functions
# fixed as compiled or interpreted when triton.language is imported, which would tie the
# interpreted copy of this module to TRITON_INTERPRET at that moment. Triton's own combine
# functions, where present, let the interpreter reduce in numpy instead of element by element.
_sum_combine = getattr(tl.standard, "_sum_combine", _add)
_max_combine = getattr(tl.standard, "_elementwise_max", _max)


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): e^-|x| <= 1 never overflows. log1p(z) takes a
    # short series for small z, where log(1 + z) would lose z's low bits (and the GPU's fast
    # log has an absolute, not relative, error near 1).
    z = tl.exp(-tl.abs(x))
    series = z * (1.0 - z * (0.5 - z * (0.3333333333333333 - z * 0.25)))
    log1p = tl.where(z < 1e-2, series, tl.log(1.0 + z))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _sigmoid(x):
    # 1 / (1 + e^-x) written with e^-|x| so neither branch overflows.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + z), z / (1.0 + z))


# tl.dot variants (DOT_MODE): 0 Triton's default (tensor cores for 16-bit inputs, TF32 for
# float32), 1 full float32 products, 2 operands upcast to float32 first (the interpreter keeps
# bfloat16 as raw 16-bit integers, which its numpy matmul would multiply as integers).


@triton.jit
def _dot(a, b, acc, DOT_MODE: tl.constexpr):
    if DOT_MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_MODE == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _score_tile(
    g_ptr,
    lt_ptr,
    offs_i,
    offs_r,
    n_rows,
    n_cols,
    dim,
    stride_gn,
    stride_gd,
    stride_lr,
    stride_ld,
    DOT_MODE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """s[offs_i, offs_r] = g[offs_i] . lt[offs_r]^T in float32; zero outside the matrix."""
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_i < n_rows
    col_ok = offs_r < n_cols
    # (BLOCK_I, BLOCK_D) tile of g and the (BLOCK_D, BLOCK_R) transposed tile of lt.
    g_ptrs = g_ptr + offs_i[:, None] * stride_gn + offs_d[None, :] * stride_gd
    l_ptrs = lt_ptr + offs_r.to(tl.int64)[None, :] * stride_lr + offs_d[:, None] * stride_ld
    acc = tl.full((BLOCK_I, BLOCK_R), 0.0, tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d_ok = offs_d < dim - d0
        g = tl.load(g_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lv = tl.load(l_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(g, lv, acc, DOT_MODE)  # (BI, BD) x (BD, BR) -> (BI, BR)
        g_ptrs += BLOCK_D * stride_gd
        l_ptrs += BLOCK_D * stride_ld
    return acc


@triton.jit
def mi_forward_kernel(
    g_ptr,
    lt_ptr,
    pos_ptr,
    stat_ptr,
    n_rows,
    n_cols,
    dim,
    hw,
    tiles_per_split,
    stride_gn,
    stride_gd,
    stride_lr,
    stride_ld,
    stride_stat,
    IS_JSD: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Scores of BLOCK_I rows against one split of the columns, reduced to row statistics.

    Program (pid_i, pid_s) owns rows pid_i*BLOCK_I.. and the column tiles
    pid_s*tiles_per_split.. (tiles past the matrix are fully masked). It writes
      pos[r]          the positive score s[r // HW, r], for the columns whose positive row it owns;
      stat[i, pid_s]  JSD: sum over its negatives of sp(s[i, r]);
                      NCE/DV: log-sum-exp over its negatives of s[i, r] (-inf if none).
    """
    pid_i = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_i * BLOCK_I
    offs_i = row0 + tl.arange(0, BLOCK_I)
    row_ok = offs_i < n_rows
    neg_inf = float("-inf")

    run_sum = tl.full((BLOCK_I,), 0.0, tl.float32)
    run_max = tl.full((BLOCK_I,), neg_inf, tl.float32)
    for t in range(0, tiles_per_split):
        offs_r = (pid_s * tiles_per_split + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        col_ok = offs_r < n_cols
        s = _score_tile(
            g_ptr,
            lt_ptr,
            offs_i,
            offs_r,
            n_rows,
            n_cols,
            dim,
            stride_gn,
            stride_gd,
            stride_lr,
            stride_ld,
            DOT_MODE,
            BLOCK_I,
            BLOCK_R,
            BLOCK_D,
        )
        img = offs_r // hw
        is_pos = offs_i[:, None] == img[None, :]
        neg = row_ok[:, None] & col_ok[None, :] & (offs_i[:, None] != img[None, :])

        # Each column has one positive row; keep it if that row is one of ours.
        pos_vals = tl.reduce(tl.where(is_pos, s, 0.0), 0, _sum_combine)  # (BR,)
        owns_pos = col_ok & (img >= row0) & (img < row0 + BLOCK_I)
        tl.store(pos_ptr + offs_r, pos_vals, mask=owns_pos)

        if IS_JSD:
            run_sum += tl.reduce(tl.where(neg, _softplus(s), 0.0), 1, _sum_combine)
        else:
            # Online log-sum-exp: rescale the running sum to the new running maximum.
            tile_max = tl.reduce(tl.where(neg, s, neg_inf), 1, _max_combine)
            new_max = tl.maximum(run_max, tile_max)
            shift = tl.where(new_max == neg_inf, 0.0, new_max)
            tile_sum = tl.reduce(
                tl.exp(tl.where(neg, s - shift[:, None], neg_inf)), 1, _sum_combine
            )
            run_sum = run_sum * tl.exp(run_max - shift) + tile_sum
            run_max = new_max

    if IS_JSD:
        stat = run_sum
    else:
        stat = tl.where(
            run_sum > 0.0, run_max + tl.log(tl.where(run_sum > 0.0, run_sum, 1.0)), neg_inf
        )
    tl.store(stat_ptr + offs_i * stride_stat + pid_s, stat, mask=row_ok)


@triton.jit
def mi_dscore_kernel(
    g_ptr,
    lt_ptr,
    dpos_ptr,
    coef_ptr,
    shift_ptr,
    ds_ptr,
    n_rows,
    n_cols,
    dim,
    hw,
    col0,
    chunk_cols,
    stride_gn,
    stride_gd,
    stride_lr,
    stride_ld,
    stride_dsn,
    IS_JSD: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Recompute a score tile and write its (scaled) gradient into the chunk buffer.

    ds[i, c] for column r = col0 + c:
      positive (r // HW == i): dpos[r]                              (precomputed per column)
      negative, JSD:           coef[i] * sigmoid(s[i, r])
      negative, NCE/DV:        coef[i] * exp(s[i, r] - shift[i])    (shift >= every exponent)
    """
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_c = pid_c * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_r = col0 + offs_c
    row_ok = offs_i < n_rows
    col_ok = offs_c < chunk_cols
    s = _score_tile(
        g_ptr,
        lt_ptr,
        offs_i,
        offs_r,
        n_rows,
        n_cols,
        dim,
        stride_gn,
        stride_gd,
        stride_lr,
        stride_ld,
        DOT_MODE,
        BLOCK_I,
        BLOCK_R,
        BLOCK_D,
    )
    img = offs_r // hw
    is_pos = offs_i[:, None] == img[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    neg = valid & (offs_i[:, None] != img[None, :])

    coef = tl.load(coef_ptr + offs_i, mask=row_ok, other=0.0)
    if IS_JSD:
        neg_grad = coef[:, None] * _sigmoid(s)
    else:
        shift = tl.load(shift_ptr + offs_i, mask=row_ok, other=0.0)
        neg_grad = coef[:, None] * tl.exp(tl.where(neg, s - shift[:, None], float("-inf")))
    dpos = tl.load(dpos_ptr + offs_r, mask=col_ok, other=0.0)
    ds = tl.where(is_pos, dpos[None, :], tl.where(neg, neg_grad, 0.0))
    ds_ptrs = ds_ptr + offs_i[:, None] * stride_dsn + offs_c[None, :]
    tl.store(ds_ptrs, ds.to(ds_ptr.dtype.element_ty), mask=valid)


@triton.jit
def mi_grad_global_kernel(
    ds_ptr,
    lt_ptr,
    acc_ptr,
    n_rows,
    chunk_cols,
    col0,
    dim,
    stride_dsn,
    stride_lr,
    stride_ld,
    stride_accn,
    DOT_MODE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """acc[i, d] += sum_c ds[i, c] * lt[col0 + c, d]: one chunk's share of dL/dg (unscaled).

    Program (pid_i, pid_d) owns an (BLOCK_I, BLOCK_D) block of acc, so the read-modify-write
    needs no atomics and the sum is deterministic.
    """
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = offs_i < n_rows
    d_ok = offs_d < dim
    ds_ptrs = ds_ptr + offs_i[:, None] * stride_dsn + offs_c[None, :]
    l_ptrs = (
        lt_ptr + (col0 + offs_c).to(tl.int64)[:, None] * stride_lr + offs_d[None, :] * stride_ld
    )
    acc = tl.full((BLOCK_I, BLOCK_D), 0.0, tl.float32)
    for c0 in range(0, chunk_cols, BLOCK_C):
        c_ok = offs_c < chunk_cols - c0
        ds = tl.load(ds_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        lv = tl.load(l_ptrs, mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(ds, lv, acc, DOT_MODE)  # (BI, BC) x (BC, BD) -> (BI, BD)
        ds_ptrs += BLOCK_C
        l_ptrs += BLOCK_C * stride_lr
    out_ptrs = acc_ptr + offs_i[:, None] * stride_accn + offs_d[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    prev = tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, prev + acc, mask=out_mask)


@triton.jit
def mi_grad_local_kernel(
    ds_ptr,
    g_ptr,
    dlt_ptr,
    factor_ptr,
    n_rows,
    chunk_cols,
    col0,
    dim,
    stride_dsn,
    stride_gn,
    stride_gd,
    stride_dlr,
    stride_dld,
    DOT_MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """dlt[col0 + c, d] = factor * sum_i ds[i, c] * g[i, d]: the chunk's rows of dL/dlt."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, BLOCK_I)
    c_ok = offs_c < chunk_cols
    d_ok = offs_d < dim
    # (BLOCK_C, BLOCK_I) tile of ds^T and (BLOCK_I, BLOCK_D) tile of g.
    dst_ptrs = ds_ptr + offs_c[:, None] + offs_i[None, :] * stride_dsn
    g_ptrs = g_ptr + offs_i[:, None] * stride_gn + offs_d[None, :] * stride_gd
    acc = tl.full((BLOCK_C, BLOCK_D), 0.0, tl.float32)
    for i0 in range(0, n_rows, BLOCK_I):
        i_ok = offs_i < n_rows - i0
        dst = tl.load(dst_ptrs, mask=c_ok[:, None] & i_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(dst, g, acc, DOT_MODE)  # (BC, BI) x (BI, BD) -> (BC, BD)
        dst_ptrs += BLOCK_I * stride_dsn
        g_ptrs += BLOCK_I * stride_gn
    factor = tl.load(factor_ptr)
    rows = (col0 + offs_c).to(tl.int64)
    out_ptrs = dlt_ptr + rows[:, None] * stride_dlr + offs_d[None, :] * stride_dld
    out = (acc * factor).to(dlt_ptr.dtype.element_ty)
    tl.store(out_ptrs, out, mask=c_ok[:, None] & d_ok[None, :])
