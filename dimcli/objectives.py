"""Mutual-information objectives of Deep InfoMax: the JSD, NCE and DV estimators.

Scores come from dot products ("encode-and-dot-product" critics). For a batch of N images,
with global vectors g_i (D,) and local vectors l_{j,k} (D,) at location k of image j:

    s[i, j, k] = <g_i, l_{j,k}>                      shape (N, N, HW)

Positives are i == j; negatives are i != j at every location (N - 1 per positive location,
times HW). With sp(z) = log(1 + e^z):

    JSD: loss = mean_{i,k} sp(-s[i,i,k]) + mean_{i!=j,k} sp(s[i,j,k])
         estimate = 2 log 2 - loss
    NCE: loss = mean_{i,k} [ -s[i,i,k] + log(e^{s[i,i,k]} + sum_{j!=i,k'} e^{s[i,j,k']}) ]
         estimate = log(1 + (N - 1) HW) - loss
    DV:  loss = -mean_{i,k} s[i,i,k] + log mean_{i!=j,k} e^{s[i,j,k]}
         estimate = -loss

Every reduction runs in float32 at least (softplus and max-subtracted log-sum-exp), whatever
the input dtype. The reference path below materialises the score tensor a block of rows at a
time; `kernel="fused"` (or "auto" on CUDA) uses the Triton path in `dimcli.kernels`, which never
stores it.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Estimator = Literal["jsd", "nce", "dv"]
Kernel = Literal["auto", "fused", "reference"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
KERNELS: tuple[str, ...] = get_args(Kernel)


def local_mi(
    local: Tensor,
    global_: Tensor,
    estimator: str,
    *,
    kernel: str = "auto",
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """MI between each global vector and the local vectors of every location, averaged.

    Args:
        local: local critic output, (N, D, H, W).
        global_: global critic output, (N, D).
        estimator: "jsd", "nce" or "dv".
        kernel: "reference", "fused" (Triton; CPU tensors run the Triton interpreter, slowly,
            for testing) or "auto" (fused on CUDA when Triton is available, else reference).
        chunk: reference path only: score at most this many rows of the batch at once, so
            the live score block is (chunk, N, HW) instead of (N, N, HW). Chunks are
            recomputed in the backward pass (activation checkpointing).

    Returns:
        (loss, estimate): the scalar loss to minimise and the MI lower-bound estimate in nats
        (detached), both float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, a batch of fewer than 2, an unknown estimator or kernel.
    """
    _check_inputs(local, global_, estimator, kernel)
    if _use_fused(local, kernel):
        from dimcli.kernels import fused_local_mi

        loss, estimate = fused_local_mi(local, global_, estimator)
        return loss, estimate.detach()
    return _reference_local_mi(local, global_, estimator, chunk)


def global_mi(
    a: Tensor, b: Tensor, estimator: str, *, kernel: str = "auto", chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """MI between paired vectors a_i and b_i (both (N, D)): `local_mi` with one location.

    Scores are s[i, j] = <a_i, b_j>; positives i == j.
    """
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"global_mi expects two (N, D) tensors, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return local_mi(b[:, :, None, None], a, estimator, kernel=kernel, chunk=chunk)


def _check_inputs(local: Tensor, global_: Tensor, estimator: str, kernel: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
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


def _use_fused(local: Tensor, kernel: str) -> bool:
    if kernel == "reference":
        return False
    if kernel == "fused":
        return True
    if not local.is_cuda:
        return False
    from dimcli.kernels import triton_available

    return triton_available()


def _reference_local_mi(
    local: Tensor, global_: Tensor, estimator: str, chunk: int | None
) -> tuple[Tensor, Tensor]:
    n, d, h, w = local.shape
    hw = h * w
    dtype = torch.promote_types(local.dtype, torch.float32)
    lv = local.reshape(n, d, hw).to(dtype)  # (N, D, HW)
    gv = global_.to(dtype)  # (N, D)

    pos, neg = _score_rows(gv, lv, 0, estimator, chunk)

    n_neg = n * (n - 1) * hw
    if estimator == "jsd":
        # pos: (N,) sums of sp(-s_iik) over k; neg: (N,) sums of sp(s_ijk) over j != i, k.
        loss = pos.sum() / (n * hw) + neg.sum() / n_neg
        estimate = 2.0 * math.log(2.0) - loss
    elif estimator == "nce":
        # pos: (N, HW) positive scores; neg: (N,) log-sum-exp of each row's negatives.
        per_location = -pos + torch.logaddexp(pos, neg[:, None])  # (N, HW)
        loss = per_location.mean()
        estimate = math.log(1.0 + (n - 1) * hw) - loss
    else:
        # pos: (N,) sums of s_iik over k; neg: (N,) log-sum-exp of each row's negatives.
        loss = -pos.sum() / (n * hw) + torch.logsumexp(neg, dim=0) - math.log(n_neg)
        estimate = -loss
    return loss, estimate.detach()


def local_mi_rows(
    local: Tensor,
    global_rows: Tensor,
    row_start: int,
    estimator: str,
    *,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row statistics of rows row_start .. row_start + R of a batch, scored against all of it.

    Row i is the global vector of image row_start + i; its positives are that image's locations
    and every other image of the batch is a negative. The reference path of `local_mi` combines
    these statistics over all N rows; a multi-process run with global negatives
    (`dimcli.distributed`) computes them for its own rows against the local maps gathered from
    every process, and combines them across processes.

    Args:
        local: local critic output of the whole batch, (N, D, H, W).
        global_rows: global critic output of the R rows, (R, D).
        row_start: batch index of the first row (0 <= row_start <= N - R).
        estimator: "jsd", "nce" or "dv".
        chunk: score at most this many rows at once (recomputed in backward), as in `local_mi`.

    Returns:
        (pos, neg), float32 (float64 for float64 inputs):
        jsd: (R,) sums of sp(-s[i,i,k]) over k, and (R,) sums of sp(s[i,j,k]) over j != i, k;
        nce: (R, HW) positive scores, and (R,) log-sum-exp of each row's negatives;
        dv: (R,) sums of s[i,i,k] over k, and (R,) log-sum-exp of each row's negatives.

    Raises:
        ValueError: bad shapes, rows outside the batch, a batch of fewer than 2, an unknown
            estimator.
    """
    if global_rows.dim() != 2:
        raise ValueError(f"global_rows must be (R, D), got {tuple(global_rows.shape)}")
    r, d = global_rows.shape
    if local.dim() != 4 or local.shape[1] != d:
        raise ValueError(
            f"local must be (N, D, H, W) with D = {d} like global_rows, got {tuple(local.shape)}"
        )
    n, _, h, w = local.shape
    if not 0 <= row_start <= n - r:
        raise ValueError(f"rows {row_start} .. {row_start + r - 1} are outside a batch of {n}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if n < 2:
        raise ValueError(f"batch size must be at least 2 to have negatives, got {n}")
    dtype = torch.promote_types(local.dtype, torch.float32)
    lv = local.reshape(n, d, h * w).to(dtype)  # (N, D, HW)
    return _score_rows(global_rows.to(dtype), lv, row_start, estimator, chunk)


def _score_rows(
    g_rows: Tensor, lv: Tensor, row_start: int, estimator: str, chunk: int | None
) -> tuple[Tensor, Tensor]:
    """`_row_stats` of every row, a block of `chunk` rows at a time."""
    r = g_rows.shape[0]
    rows = r if chunk is None else max(1, min(int(chunk), r))
    pos_parts, neg_parts = [], []
    for start in range(0, r, rows):
        block = g_rows[start : start + rows]
        at = row_start + start
        if rows < r and torch.is_grad_enabled() and (block.requires_grad or lv.requires_grad):
            # Recompute the (rows, N, HW) block in backward instead of keeping every block.
            pos, neg = checkpoint(_row_stats, block, lv, at, estimator, use_reentrant=False)
        else:
            pos, neg = _row_stats(block, lv, at, estimator)
        pos_parts.append(pos)
        neg_parts.append(neg)
    return torch.cat(pos_parts), torch.cat(neg_parts)


def _row_stats(g_rows: Tensor, lv: Tensor, start: int, estimator: str) -> tuple[Tensor, Tensor]:
    """Per-row statistics of the score block for rows start .. start + R of the batch.

    Legend: r = row (global vector), j = image (local map), d = channel, k = location.
    """
    r = g_rows.shape[0]
    n, _, hw = lv.shape
    scores = torch.einsum("rd,jdk->rjk", g_rows, lv)  # (R, D) x (N, D, HW) -> (R, N, HW)

    rows = torch.arange(r, device=scores.device)
    is_pos = torch.zeros(r, n, dtype=torch.bool, device=scores.device)
    is_pos[rows, rows + start] = True
    pos_scores = scores[rows, rows + start]  # (R, HW)
    neg_mask = ~is_pos[:, :, None]  # (R, N, 1) broadcast over locations

    if estimator == "jsd":
        pos = F.softplus(-pos_scores).sum(dim=1)  # (R,)
        neg = (F.softplus(scores) * neg_mask).sum(dim=(1, 2))  # (R,)
        return pos, neg
    # NCE and DV need each row's log-sum-exp over its negatives: -inf hides the positives.
    neg_lse = scores.masked_fill(~neg_mask, float("-inf")).reshape(r, n * hw).logsumexp(dim=1)
    if estimator == "nce":
        return pos_scores, neg_lse
    return pos_scores.sum(dim=1), neg_lse
