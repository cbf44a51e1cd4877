"""Accuracy, and the documented deviations of the fused backends.

fastclip accumulates fp32 grads in float64 and fp16/bf16 grads in float32,
and never rounds per-tensor norms to the grad dtype.  So its norm is at least
as accurate as torch's, a total beyond the grad dtype's range still clips
(torch zeroes the grads), and the returned norm keeps torch's dtype.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import fastclip
from fastclip.backends.cpu import _ext

from .helpers import check_clip_grad_norm, interpreted, make_params, reference_norm

CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [1, 2, "inf"])
def test_at_least_as_accurate_as_torch(fused, dtype, norm_type, seed):
    # odd sizes, several units per tensor, values over many magnitudes
    shapes = [(40_001,), (333, 77), (5,), (0,), (70_000,)]
    if interpreted(fused):  # Triton's interpreter is slow; its units are 512 elements
        shapes = [(4_001,), (33, 77), (5,), (0,), (1_100,)]
    if norm_type == "inf":  # no empty grads: torch raises for those
        shapes = [s for s in shapes if s != (0,)]
    params = make_params(shapes, dtype=dtype)
    for p in params:
        p.grad.mul_(torch.logspace(-3, 1, p.grad.numel(), dtype=torch.float64).view(p.grad.shape).to(dtype))
    for max_norm in (1e9, 1.0):
        check_clip_grad_norm(params, fused, max_norm, norm_type)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("norm_type", [1, 2])
def test_fp64_norms_are_nearly_correctly_rounded(fused, layout, norm_type, seed):
    # float64 sums carry their rounding errors (TwoSum), like torch's cascade sums
    base = torch.randn(300, 170, dtype=torch.float64) * torch.logspace(-4, 4, 170, dtype=torch.float64)
    grad = base if layout == "contiguous" else base[:, 1::3]
    exact = reference_norm([grad], norm_type)
    ours = fastclip.get_total_norm([grad], norm_type, backend=fused).item()
    theirs = torch.nn.utils.get_total_norm([grad], norm_type).item()
    # the CPU kernels' float64 sums are compensated; the GPU kernels' are plain
    # float64 tree sums, which land 2 ulps off now and then (about 1 seed in 100)
    ulps = 1 if fused == "cpu" else 2
    assert abs(ours - exact) <= ulps * math.ulp(exact)
    assert abs(ours - exact) <= abs(theirs - exact) + ulps * math.ulp(exact)


def test_fp32_norm_error_vs_torch_on_a_large_tensor(fused, seed):
    g = torch.randn(100_000 if interpreted(fused) else 4_000_000) * 3 + 1
    exact = torch.linalg.vector_norm(g.double()).item()  # squares of floats are exact in float64
    ours = fastclip.get_total_norm([g], backend=fused).item()
    theirs = torch.nn.utils.get_total_norm([g]).item()
    assert abs(ours - exact) <= max(abs(theirs - exact), exact * 2**-24)
    assert abs(ours - exact) <= exact * 2**-24  # correctly rounded to float32 or within half an ulp more


def test_fp16_total_beyond_range_clips_instead_of_zeroing(fused):
    # 1000 fp16 grads equal to 3000: true norm 94 868 > 65504 (100 grads of
    # 7000 under Triton's slow interpreter: 70 000)
    count, value = (100, 7000.0) if interpreted(fused) else (1000, 3000.0)
    params = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float16)) for _ in range(count)]
    for p in params:
        p.grad = torch.full((1,), value, dtype=torch.float16)
    ref = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float16)) for _ in range(count)]
    for p in ref:
        p.grad = torch.full((1,), value, dtype=torch.float16)
    total = fastclip.clip_grad_norm_(params, 1.0, backend=fused)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    # torch: inf, grads zeroed
    assert ref_total.item() == math.inf and all(p.grad.item() == 0 for p in ref)
    # fastclip: same return dtype (inf does not fit fp16), but the grads are clipped to max_norm
    assert total.dtype == torch.float16 and total.item() == math.inf
    clipped_norm = math.sqrt(sum(p.grad.double().item() ** 2 for p in params))
    assert clipped_norm == pytest.approx(1.0, rel=2e-3)
    # the returned norm is non-finite, so error_if_nonfinite raises, as in torch
    for p in params:
        p.grad.fill_(value)
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend=fused)
    assert all(p.grad.item() == value for p in params)


def test_fp32_sum_of_squares_beyond_range_still_clips(fused):
    # torch squares and sums in float32: 1e30**2 overflows and every grad is zeroed
    p, q = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    p.grad, q.grad = torch.full((4,), 1e30), torch.full((4,), 1e30)
    total = fastclip.clip_grad_norm_([p], 1.0, backend=fused)
    ref_total = torch.nn.utils.clip_grad_norm_([q], 1.0)
    assert ref_total.item() == math.inf and torch.all(q.grad == 0)
    assert total.item() == pytest.approx(2e30, rel=1e-6)  # the norm itself fits in float32
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(1.0, rel=1e-5)


def test_fp32_total_beyond_float32s_range_zeroes_as_torch(fused):
    # the float64 sum is finite, but the total the coefficient takes is float32: inf, as torch's
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.full((2,), 3e38), torch.full((2,), 3e38)
    total = fastclip.clip_grad_norm_([p], 1.0, backend=fused)
    ref_total = torch.nn.utils.clip_grad_norm_([q], 1.0)
    assert total.item() == ref_total.item() == math.inf
    assert torch.equal(p.grad, q.grad) and torch.all(p.grad == 0)


@pytest.mark.parametrize("scale", [1e20, 3e-20, 1e-22, 1e-25, 0.0])
@pytest.mark.parametrize("norm_type", [1, 2])
def test_bf16_sums_beyond_float32s_range_on_the_cpu(scale, norm_type, seed):
    """bfloat16 has float32's exponent range: squares of values beyond ~1e19
    overflow float32 and squares below ~1e-19 lose bits, so the CPU kernels sum
    such runs again in double (long runs, strided ones and the tail alike).
    The GPU backends keep float32 within a unit there, as torch does (README)."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(40_003, generator=g, dtype=torch.float64) * scale).to(torch.bfloat16)
    grads = [values, values[:333], values[1::3], values[:2]]  # long, short, strided, tail only
    if scale:
        grads.append(values.clone().fill_(0).index_fill_(0, torch.tensor([7]), scale))  # one value among zeros
    for grad in grads:
        exact = torch.linalg.vector_norm(grad.double(), norm_type).item()
        stats = fastclip.grad_stats([_holder(grad)], norm_type, backend="cpu")
        got = stats.per_tensor_norms.item()
        assert got == pytest.approx(exact, rel=2**-22, abs=0), (scale, grad.shape)
        p = _holder(grad.clone())
        norms = fastclip.clip_grad_norm_per_tensor_([p], 1.0, norm_type, backend="cpu")
        assert norms.item() == pytest.approx(exact, rel=2**-22, abs=0), (scale, grad.shape)
        if grad.is_contiguous():  # (clone() makes the strided view dense: summed in another order, it
            assert norms.item() == got  # may round to the float32 neighbour of a near-tie; seed 965140105)
        if scale > 1:  # clipped to norm 1, not zeroed (torch's bf16 norm is inf here)
            assert torch.linalg.vector_norm(p.grad.double(), norm_type).item() == pytest.approx(1.0, rel=2**-6)


def _holder(grad):
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    return p


def test_bf16_norm_is_not_rounded_per_tensor(fused, seed):
    params = make_params([(1000,)] * 50, dtype=torch.bfloat16)
    exact = reference_norm([p.grad for p in params], 2)
    ours = fastclip.get_total_norm([p.grad for p in params], backend=fused)
    theirs = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert ours.dtype == theirs.dtype == torch.bfloat16
    # ours is the correctly rounded bf16 value of the exact norm (or a neighbour)
    assert abs(ours.double().item() - exact) <= abs(theirs.double().item() - exact) + exact * 2**-8


def _torch_coefficient(total: float, dtype: torch.dtype, max_norm: float) -> float:
    return torch.clamp(max_norm / (torch.tensor(total, dtype=dtype) + 1e-6), max=1.0).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficient_rounds_exactly_like_torch(dtype, seed):
    """The C++ coefficient (coefficients.h, which the CPU and CUDA kernels share;
    the Triton twin is checked through the clip tests) against torch's formula."""
    rng = random.Random(seed)
    specials = [0.0, 1e-6, 1e-7, 1.0, 2.0, 1e30, 3e38, math.inf, math.nan, 1e-45, 5e-324]
    cases = [(t, m) for t in specials for m in (1.0, 0.5, 0.0, -1.0, 1e-3, math.inf, math.nan, 1e300)]
    for _ in range(20_000):
        t = 10 ** rng.uniform(-8, 8)
        cases.append((t, t * rng.choice([0.5, 0.999, 1.0, 1.0000001, 2.0, rng.uniform(0, 3)])))
    code = CODES[dtype]
    for t, m in cases:
        t = _ext.round_to_dtype(t, code)
        ours = _ext.clip_coefficient(t, code, m)
        theirs = _torch_coefficient(t, dtype, m)
        assert (ours == theirs) or (math.isnan(ours) and math.isnan(theirs)), (t, m, ours, theirs)


def test_round_to_dtype_matches_torch_conversions():
    values = [0.1, 1 / 3, 65504.0, 65519.0, 65520.0, 1e-8, 6e-8, 3e-5, 1e39, -2.5, math.inf, 3.3895e38, 3.39e38, 1e-40]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for v in values:
            want = torch.tensor(v, dtype=torch.float32).to(dtype).double().item()
            got = _ext.round_to_dtype(v, CODES[dtype])
            assert got == want or (math.isnan(got) and math.isnan(want)), (dtype, v, got, want)
