"""The fused Triton local-MI kernels against slow loops over the formulas of DIM_REFERENCE.md.

Everything runs on the CPU: `fused_local_mi` runs CPU tensors through Triton's interpreter
(a private interpreted copy of the kernels, so TRITON_INTERPRET need not be set). The
interpreter is slow, so shapes stay tiny; with 16-wide interpreter tiles they still cover
several row blocks, column tiles, column splits, D steps and backward chunks.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dimcli.kernels import fused_local_mi, triton_available

pytestmark = pytest.mark.skipif(
    not triton_available(), reason="triton is not importable; the fused kernels need it"
)

ESTIMATORS = ("jsd", "nce", "dv")


# ==== slow reference: explicit loops over i, j, k in float64 ====


def sp(z: torch.Tensor) -> torch.Tensor:
    """softplus log(1 + e^z), stable for large |z|."""
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-z.abs()))


def log_sum_exp(terms: list[torch.Tensor]) -> torch.Tensor:
    """log sum_t e^t with the maximum subtracted."""
    top = max(t.detach().item() for t in terms)
    return top + torch.log(sum(torch.exp(t - top) for t in terms))  # type: ignore[arg-type]


def loop_reference(
    local: torch.Tensor, global_: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, estimate) as float64 0-dim tensors, differentiable in the float64 inputs."""
    n, d, h, w = local.shape
    hw = h * w
    lv = local.reshape(n, d, hw)
    s = [
        [[torch.dot(global_[i], lv[j, :, k]) for k in range(hw)] for j in range(n)]
        for i in range(n)
    ]
    pos = [(i, k) for i in range(n) for k in range(hw)]
    neg = [(i, j, k) for i in range(n) for j in range(n) if j != i for k in range(hw)]

    if estimator == "jsd":
        pos_term = sum(sp(-s[i][i][k]) for i, k in pos) / len(pos)
        neg_term = sum(sp(s[i][j][k]) for i, j, k in neg) / len(neg)
        loss = pos_term + neg_term
        return loss, 2 * math.log(2) - loss  # type: ignore[return-value]
    if estimator == "nce":
        # log sum_{j!=i,k'} e^{s[i,j,k']} does not depend on k: one value per row.
        row_lse = [
            log_sum_exp([s[i][j][kk] for j in range(n) if j != i for kk in range(hw)])
            for i in range(n)
        ]
        total = torch.zeros((), dtype=torch.float64)
        for i, k in pos:
            total = total - s[i][i][k] + torch.logaddexp(s[i][i][k], row_lse[i])
        loss = total / len(pos)
        return loss, math.log(1 + (n - 1) * hw) - loss
    mean_pos = sum(s[i][i][k] for i, k in pos) / len(pos)
    log_mean_exp = log_sum_exp([s[i][j][k] for i, j, k in neg]) - math.log(len(neg))
    loss = -mean_pos + log_mean_exp
    return loss, -loss


def objectives_reference(
    local: torch.Tensor, global_: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's own reference path (`kernel="reference"`)."""
    from dimcli.objectives import local_mi

    return local_mi(local, global_, estimator, kernel="reference")


def objectives_available() -> bool:
    try:
        from dimcli.objectives import local_mi  # noqa: F401
    except ImportError:
        return False
    return True


# ==== helpers ====


def make_inputs(shape: tuple[int, int, int, int], scale: float, seed: int) -> tuple[Any, Any]:
    """float32 inputs local (N, D, H, W) and global (N, D) whose scores have std `scale`."""
    gen = torch.Generator().manual_seed(seed)
    n, d, h, w = shape
    local = torch.randn(n, d, h, w, generator=gen) * math.sqrt(scale / math.sqrt(d))
    global_ = torch.randn(n, d, generator=gen) * math.sqrt(scale / math.sqrt(d))
    return local.float(), global_.float()


def grads_of(
    fn: Any, local: torch.Tensor, global_: torch.Tensor, estimator: str, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss, estimate, d loss/d local, d loss/d global for `fn`."""
    local = local.detach().clone().requires_grad_()
    global_ = global_.detach().clone().requires_grad_()
    loss, estimate = fn(local, global_, estimator, **kwargs)
    d_local, d_global = torch.autograd.grad(loss, (local, global_))
    return loss.detach(), torch.as_tensor(estimate).detach(), d_local, d_global


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| elementwise (a scale-aware tolerance)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    bound = rel * max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} (rel {rel})"


# Shapes (N, D, H, W): N = 2 and HW = 1; odd N with HW = 49 and D not a multiple of 16;
# N = 18 > one 16-row block (the global objective's shape); several D steps.
SHAPES = [(2, 5, 1, 1), (5, 24, 7, 7), (18, 7, 1, 1), (3, 40, 2, 3)]
# Last: scores of median magnitude ~50 and up to ~230, where e^s overflows float32.
CASES = [(shape, 4.0) for shape in SHAPES] + [((4, 6, 3, 3), 60.0)]


@functools.cache
def fused_result(shape: tuple[int, int, int, int], scale: float, estimator: str) -> tuple[Any, ...]:
    local, global_ = make_inputs(shape, scale, seed=sum(shape))
    return grads_of(fused_local_mi, local, global_, estimator)


@pytest.mark.parametrize("reference", ["loops", "objectives"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(("shape", "scale"), CASES)
def test_fused_matches_reference(
    shape: tuple[int, int, int, int], scale: float, estimator: str, reference: str
) -> None:
    if reference == "objectives" and not objectives_available():
        pytest.skip("dimcli.objectives is not importable yet")
    local, global_ = make_inputs(shape, scale, seed=sum(shape))
    if scale > 10:
        n, d, h, w = shape
        scores = torch.einsum("id,jdk->ijk", global_, local.reshape(n, d, h * w))
        assert scores.abs().max() > 89.0  # the case is extreme: e^89 overflows float32
    loss, estimate, d_local, d_global = fused_result(shape, scale, estimator)
    if reference == "loops":
        ref = grads_of(loop_reference, local.double(), global_.double(), estimator)
    else:
        ref = grads_of(objectives_reference, local, global_, estimator)
    ref_loss, ref_estimate, ref_d_local, ref_d_global = ref

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert estimate.dtype == torch.float32 and estimate.dim() == 0
    assert torch.isfinite(loss) and torch.isfinite(estimate)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4, abs=1e-6)
    assert estimate.item() == pytest.approx(ref_estimate.item(), rel=1e-4, abs=1e-5)
    assert d_local.dtype == torch.float32 and d_global.dtype == torch.float32
    assert_close(d_local, ref_d_local, rel=1e-4)
    assert_close(d_global, ref_d_global, rel=1e-4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_backward_in_chunks_matches_one_chunk(estimator: str) -> None:
    # 75 columns in chunks of 32: three chunks, the last one partial.
    local, global_ = make_inputs((3, 20, 5, 5), 4.0, seed=7)
    whole = grads_of(fused_local_mi, local, global_, estimator)
    chunked = grads_of(fused_local_mi, local, global_, estimator, chunk=32)
    ref = grads_of(loop_reference, local.double(), global_.double(), estimator)
    for got, want, exact in zip(chunked[2:], whole[2:], ref[2:], strict=True):
        assert_close(got, want, rel=1e-6)
        assert_close(got, exact, rel=1e-4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradient_through_estimate_is_minus_loss_gradient(estimator: str) -> None:
    local, global_ = make_inputs((3, 8, 2, 2), 4.0, seed=3)
    local.requires_grad_()
    loss, estimate = fused_local_mi(local, global_, estimator)
    (d_est,) = torch.autograd.grad(estimate, local, retain_graph=True)
    (d_loss,) = torch.autograd.grad(loss, local)
    assert_close(d_est, -d_loss, rel=1e-6)
    # Using both outputs adds their gradients: 2*loss + estimate has the gradient of loss.
    local2 = local.detach().clone().requires_grad_()
    loss2, estimate2 = fused_local_mi(local2, global_, estimator)
    (d_mix,) = torch.autograd.grad(2 * loss2 + estimate2, local2)
    assert_close(d_mix, d_loss, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_half_precision_inputs(dtype: torch.dtype, estimator: str) -> None:
    local, global_ = make_inputs((3, 24, 3, 3), 4.0, seed=5)
    local, global_ = local.to(dtype), global_.to(dtype)
    loss, estimate, d_local, d_global = grads_of(fused_local_mi, local, global_, estimator)
    # The reference sees the same rounded inputs, in float64.
    ref = grads_of(loop_reference, local.double(), global_.double(), estimator)

    assert loss.dtype == torch.float32 and estimate.dtype == torch.float32
    assert d_local.dtype == dtype and d_global.dtype == dtype
    assert loss.item() == pytest.approx(ref[0].item(), rel=1e-3)
    assert_close(d_local, ref[2], rel=3e-2)
    assert_close(d_global, ref[3], rel=3e-2)


def test_channels_last_and_strided_inputs() -> None:
    # A channels-last map is scored without a copy; a non-contiguous global is fine too.
    local, global_ = make_inputs((4, 12, 3, 3), 4.0, seed=11)
    strided = torch.stack([global_, -global_], dim=2)[:, :, 0]  # (N, D), strides (2D, 2)
    cl = local.to(memory_format=torch.channels_last)
    assert not strided.is_contiguous() and cl.is_contiguous(memory_format=torch.channels_last)
    got = grads_of(fused_local_mi, cl, strided, "nce")
    want = grads_of(loop_reference, local.double(), global_.double(), "nce")
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-4)
    assert_close(got[2], want[2], rel=1e-4)
    assert_close(got[3], want[3], rel=1e-4)


# ==== memory: nothing of size N*N*HW ====


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any torch op returns while active.

    Bytes, not elements: Triton's interpreter moves kernel arguments as raw byte views.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_path_never_allocates_the_score_tensor(estimator: str) -> None:
    # N*N*HW = 1024 float32 scores (4 KiB); the inputs and their gradients are N*D*HW = 256
    # floats (1 KiB) and the backward buffer is N x 16 columns. An (N, N, HW) or (N, N*HW)
    # tensor of scores or gradients would show up.
    n, d, h, w = 8, 2, 4, 4
    local, global_ = make_inputs((n, d, h, w), 4.0, seed=2)
    local.requires_grad_()
    global_.requires_grad_()
    score_bytes = n * n * h * w * 4
    with LargestTensor() as tracker:
        loss, _ = fused_local_mi(local, global_, estimator, chunk=16)
        loss.backward()
    assert local.grad is not None and global_.grad is not None
    assert tracker.nbytes <= local.numel() * 4 < score_bytes

    # The tracker does see a materialised score tensor (so the check above can fail).
    with LargestTensor() as tracker:
        torch.einsum("id,jdk->ijk", global_, local.reshape(n, d, h * w))
    assert tracker.nbytes >= score_bytes


# ==== dispatch and errors ====


def test_objectives_dispatch_to_fused_on_cpu() -> None:
    if not objectives_available():
        pytest.skip("dimcli.objectives is not importable yet")
    from dimcli.objectives import local_mi

    local, global_ = make_inputs((3, 8, 2, 2), 4.0, seed=4)
    fused = local_mi(local, global_, "jsd", kernel="fused")
    ref = local_mi(local, global_, "jsd", kernel="reference")
    assert fused[0].item() == pytest.approx(ref[0].item(), rel=1e-5)


def test_interpreted_copy_leaves_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from dimcli.kernels import fused_mi

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused_mi, "_modules", {})  # force a fresh interpreted copy
    local, global_ = make_inputs((2, 5, 1, 1), 4.0, seed=1)
    loss, _ = fused_local_mi(local, global_, "dv")
    want, _ = loop_reference(local.double(), global_.double(), "dv")
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert "TRITON_INTERPRET" not in os.environ


def test_batch_of_one_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"batch size must be at least 2 .* got 1"):
        fused_local_mi(torch.randn(1, 4, 2, 2), torch.randn(1, 4), "jsd")


def test_unknown_estimator_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown estimator 'mine'; choose one of jsd, nce, dv"):
        fused_local_mi(torch.randn(2, 4, 2, 2), torch.randn(2, 4), "mine")


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"disagree on N or D"):
        fused_local_mi(torch.randn(2, 4, 2, 2), torch.randn(2, 5), "nce")
    with pytest.raises(ValueError, match=r"local must be \(N, D, H, W\)"):
        fused_local_mi(torch.randn(2, 4), torch.randn(2, 4), "nce")
