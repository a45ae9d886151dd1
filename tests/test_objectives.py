"""The estimators against slow loops over the formulas of DIM_REFERENCE.md."""

from __future__ import annotations

import math

import pytest
import torch

from dimcli.objectives import ESTIMATORS, global_mi, local_mi


def sp(z: float) -> float:
    """softplus, stable for large |z|."""
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def loop_reference(
    local: torch.Tensor, global_: torch.Tensor, estimator: str
) -> tuple[float, float]:
    """Loss and estimate by explicit loops over i, j, k (float64 Python arithmetic)."""
    n, d, h, w = local.shape
    hw = h * w
    g = global_.double().tolist()
    lv = local.double().reshape(n, d, hw)
    s = [
        [[sum(g[i][c] * float(lv[j, c, k]) for c in range(d)) for k in range(hw)] for j in range(n)]
        for i in range(n)
    ]
    pos = [(i, k) for i in range(n) for k in range(hw)]
    neg = [(i, j, k) for i in range(n) for j in range(n) if j != i for k in range(hw)]
    if estimator == "jsd":
        loss = sum(sp(-s[i][i][k]) for i, k in pos) / len(pos) + sum(
            sp(s[i][j][k]) for i, j, k in neg
        ) / len(neg)
        return loss, 2 * math.log(2) - loss
    if estimator == "nce":
        total = 0.0
        for i, k in pos:
            terms = [s[i][i][k]] + [s[i][j][kk] for j in range(n) if j != i for kk in range(hw)]
            top = max(terms)
            lse = top + math.log(sum(math.exp(t - top) for t in terms))
            total += -s[i][i][k] + lse
        loss = total / len(pos)
        return loss, math.log(1 + (n - 1) * hw) - loss
    negs = [s[i][j][k] for i, j, k in neg]
    top = max(negs)
    log_mean_exp = top + math.log(sum(math.exp(t - top) for t in negs) / len(negs))
    loss = -sum(s[i][i][k] for i, k in pos) / len(pos) + log_mean_exp
    return loss, -loss


SHAPES = [(2, 3, 1, 1), (3, 4, 2, 2), (5, 6, 3, 2), (4, 8, 1, 3)]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_local_mi_matches_loops(estimator: str, shape: tuple[int, ...], chunk: int | None) -> None:
    torch.manual_seed(sum(shape))
    n, d, h, w = shape
    local, global_ = torch.randn(n, d, h, w), torch.randn(n, d)
    loss, estimate = local_mi(local, global_, estimator, kernel="reference", chunk=chunk)
    ref_loss, ref_est = loop_reference(local, global_, estimator)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    assert estimate.item() == pytest.approx(ref_est, rel=1e-5, abs=1e-5)
    assert not estimate.requires_grad


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_extreme_scores_stay_finite(estimator: str) -> None:
    torch.manual_seed(0)
    n, d = 4, 2
    local = torch.randn(n, d, 2, 2).sign() * 7.0
    global_ = torch.randn(n, d).sign() * 7.0  # scores of magnitude ~ 98: e^98 overflows float32
    loss, estimate = local_mi(local, global_, estimator, kernel="reference")
    ref_loss, _ = loop_reference(local, global_, estimator)
    assert torch.isfinite(loss) and torch.isfinite(estimate)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("shape", [(3, 4, 2, 1), (2, 3, 1, 1), (2, 2, 2, 2)])
def test_gradcheck_float64(estimator: str, chunk: int | None, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    n, d, h, w = shape
    local = torch.randn(n, d, h, w, dtype=torch.float64, requires_grad=True)
    global_ = torch.randn(n, d, dtype=torch.float64, requires_grad=True)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return local_mi(a, b, estimator, kernel="reference", chunk=chunk)[0]

    assert torch.autograd.gradcheck(fn, (local, global_))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_global_mi_gradcheck_float64(estimator: str) -> None:
    torch.manual_seed(3)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y: global_mi(x, y, estimator, kernel="reference")[0], (a, b)
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (3, 2, 2, 1)])
def test_gradients_match_finite_differences_of_the_loops(
    estimator: str, shape: tuple[int, ...]
) -> None:
    # gradcheck compares autograd with the function itself; this compares it with the formula.
    torch.manual_seed(4)
    n, d, h, w = shape
    local = torch.randn(n, d, h, w, dtype=torch.float64, requires_grad=True)
    global_ = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    loss, _ = local_mi(local, global_, estimator, kernel="reference")
    grads = torch.autograd.grad(loss, (local, global_))
    eps = 1e-6
    for tensor, grad in zip((local, global_), grads, strict=True):
        flat, expected = tensor.detach().view(-1), grad.reshape(-1)
        for idx in range(flat.numel()):
            inputs = [local.detach().clone(), global_.detach().clone()]
            which = 0 if tensor is local else 1
            inputs[which].view(-1)[idx] += eps
            up = loop_reference(*inputs, estimator)[0]
            inputs[which].view(-1)[idx] -= 2 * eps
            down = loop_reference(*inputs, estimator)[0]
            assert (up - down) / (2 * eps) == pytest.approx(expected[idx].item(), abs=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_chunked_gradients_equal_unchunked(estimator: str) -> None:
    torch.manual_seed(2)
    local = torch.randn(6, 5, 3, 3, requires_grad=True)
    global_ = torch.randn(6, 5, requires_grad=True)
    grads = []
    for chunk in (None, 4):
        loss, _ = local_mi(local, global_, estimator, kernel="reference", chunk=chunk)
        grads.append(torch.autograd.grad(loss, (local, global_)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_low_precision_inputs_reduce_in_float32(dtype: torch.dtype, estimator: str) -> None:
    torch.manual_seed(3)
    local, global_ = torch.randn(4, 8, 2, 2).to(dtype), torch.randn(4, 8).to(dtype)
    loss, _ = local_mi(local, global_, estimator, kernel="reference")
    ref, _ = local_mi(local.float(), global_.float(), estimator, kernel="reference")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_global_mi_is_local_mi_with_one_location(estimator: str) -> None:
    torch.manual_seed(4)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    loss, est = global_mi(a, b, estimator, kernel="reference")
    ref_loss, ref_est = loop_reference(b[:, :, None, None], a, estimator)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert est.item() == pytest.approx(ref_est, rel=1e-5)


# ---- mask correctness: which scores count as positives and negatives ----


def _loss_with_scores(scores: torch.Tensor, estimator: str) -> torch.Tensor:
    """Build inputs whose score tensor is exactly `scores` (N, N, HW) and return the loss.

    With D = N*HW one-hot local vectors, s[i, j, k] = global_[i, j*HW + k].
    """
    n, _, hw = scores.shape
    local = torch.eye(n * hw).reshape(n, hw, n * hw).permute(0, 2, 1).reshape(n, n * hw, hw, 1)
    global_ = scores.reshape(n, n * hw)
    return local_mi(local, global_, estimator, kernel="reference")[0]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_raising_a_positive_lowers_the_loss(estimator: str) -> None:
    torch.manual_seed(5)
    scores = torch.randn(3, 3, 2)
    base = _loss_with_scores(scores, estimator)
    bumped = scores.clone()
    bumped[1, 1, 0] += 2.0
    assert _loss_with_scores(bumped, estimator) < base


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_raising_a_negative_raises_the_loss(estimator: str) -> None:
    torch.manual_seed(6)
    scores = torch.randn(3, 3, 2)
    base = _loss_with_scores(scores, estimator)
    bumped = scores.clone()
    bumped[0, 2, 1] += 2.0
    assert _loss_with_scores(bumped, estimator) > base


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_consistent_permutation_leaves_loss_unchanged(estimator: str) -> None:
    torch.manual_seed(7)
    local, global_ = torch.randn(5, 4, 2, 2), torch.randn(5, 4)
    perm = torch.randperm(5)
    a, _ = local_mi(local, global_, estimator, kernel="reference")
    b, _ = local_mi(local[perm], global_[perm], estimator, kernel="reference")
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # Permuting only one side pairs images with the wrong codes: the loss must change.
    c, _ = local_mi(local[perm], global_, estimator, kernel="reference")
    assert abs(c.item() - a.item()) > 1e-4


def test_score_helper_builds_the_scores_it_claims() -> None:
    scores = torch.randn(3, 3, 2)
    n, _, hw = scores.shape
    local = torch.eye(n * hw).reshape(n, hw, n * hw).permute(0, 2, 1).reshape(n, n * hw, hw, 1)
    got = torch.einsum("id,jdk->ijk", scores.reshape(n, n * hw), local.reshape(n, n * hw, hw))
    torch.testing.assert_close(got, scores)


# ---- errors ----


def test_batch_of_one_names_the_batch_size() -> None:
    with pytest.raises(ValueError, match="at least 2 to have negatives, got 1"):
        local_mi(torch.randn(1, 3, 2, 2), torch.randn(1, 3), "jsd")


def test_unknown_estimator_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="jsd, nce, dv"):
        local_mi(torch.randn(2, 3, 2, 2), torch.randn(2, 3), "mine")


def test_unknown_kernel_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, fused, reference"):
        local_mi(torch.randn(2, 3, 2, 2), torch.randn(2, 3), "jsd", kernel="cuda")


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match="disagree on N or D"):
        local_mi(torch.randn(2, 3, 2, 2), torch.randn(2, 4), "jsd")
    with pytest.raises(ValueError, match=r"\(N, D, H, W\)"):
        local_mi(torch.randn(2, 3), torch.randn(2, 3), "jsd")


def test_auto_kernel_uses_reference_on_cpu() -> None:
    local, global_ = torch.randn(3, 4, 2, 2), torch.randn(3, 4)
    a, _ = local_mi(local, global_, "nce")
    b, _ = local_mi(local, global_, "nce", kernel="reference")
    assert a.item() == b.item()
