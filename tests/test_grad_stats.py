"""grad_stats on every backend: the total norm, every grad's norm, and the
counts of non-finite values and zeros, in one read; nothing written."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip

from .helpers import FLOAT_DTYPES, assert_bitwise_equal, check_total_norm, grads_of, is_fused, reference_norm, ulp
from .method_refs import norms_dtype, random_params, sizes_for


def check_stats(params, backend, norm_type=2.0):
    before = grads_of(params)
    versions = [p.grad._version for p in params if p.grad is not None]
    stats = fastclip.grad_stats(params, norm_type, backend=backend)
    grads = [p.grad for p in params if p.grad is not None]
    # nothing written
    for p, g in zip(params, before):
        if g is not None:
            assert_bitwise_equal(p.grad, g)
    assert [p.grad._version for p in params if p.grad is not None] == versions
    want_total = torch.nn.utils.get_total_norm(grads, norm_type)
    assert stats.total_norm.dtype == want_total.dtype and stats.total_norm.shape == ()
    assert stats.per_tensor_norms.dtype == norms_dtype(grads) and stats.per_tensor_norms.shape == (len(grads),)
    assert stats.num_nonfinite.dtype == torch.int64 and stats.num_zeros.dtype == torch.int64
    assert stats.num_nonfinite.item() == sum(int((~torch.isfinite(g)).sum()) for g in grads)
    assert stats.num_zeros.item() == sum(int((g == 0).sum()) for g in grads)
    if not is_fused(backend) or float(norm_type) not in (1.0, 2.0, math.inf):  # torch's path
        assert_bitwise_equal(stats.total_norm, want_total)
        for k, g in enumerate(grads):
            want = torch.linalg.vector_norm(g, norm_type).to(norms_dtype(grads))
            assert_bitwise_equal(stats.per_tensor_norms[k], want)
        return stats
    if grads:
        check_total_norm(stats.total_norm, want_total, grads, norm_type, backend)
    for k, g in enumerate(grads):
        exact = reference_norm([g], norm_type)
        got = stats.per_tensor_norms[k].item()
        if math.isnan(exact):
            assert math.isnan(got)
        elif math.isinf(exact):
            assert got == exact
        else:
            assert got == pytest.approx(exact, rel=torch.finfo(torch.float32).eps * 4, abs=0)
    return stats


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stats_like_torch(backend, dtype, norm_type, seed):
    sizes = [n for n in sizes_for(backend) if n or norm_type != math.inf]
    params = random_params([(n,) for n in sizes], [dtype])
    check_stats(params, backend, norm_type)


def test_counts_of_special_values_in_every_dtype(backend):
    values = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -2.0, 1e-40, 0.0] * 11
    params = []
    for dtype in FLOAT_DTYPES:
        for n in (5, 37, len(values)):  # the SIMD body and the scalar tail
            p = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
            p.grad = torch.tensor(values[:n], dtype=torch.float64).to(dtype)
            params.append(p)
    stats = check_stats(params, backend)
    assert math.isnan(stats.total_norm.item())


def test_mixed_dtypes_shapes_none_grads_and_views(backend, seed):
    params = random_params([(5, 7), (3,), (), (40, 13), (0,), (9,)], FLOAT_DTYPES, with_none=(1,))
    base = torch.randn(12, 10)
    for grad in (base.t(), base[:, ::2]):
        p = torch.nn.Parameter(torch.zeros(grad.shape))
        p.grad = grad
        params.append(p)
    check_stats(params, backend)


@pytest.mark.parametrize("norm_type", [0.5, 3.0, 0.0, -math.inf])
def test_other_norm_types_are_torchs(backend, norm_type, seed):
    params = random_params([(10,), (3, 3), (5,)], [torch.float32])
    check_stats(params, backend, norm_type)


def test_no_grads(backend):
    stats = fastclip.grad_stats([torch.nn.Parameter(torch.ones(3))], backend=backend)
    assert_bitwise_equal(stats.total_norm, torch.tensor(0.0))
    assert stats.per_tensor_norms.shape == (0,)
    assert stats.num_nonfinite.item() == 0 and stats.num_zeros.item() == 0


def test_inf_norm_of_an_empty_grad_raises_torchs_error(backend):
    params = random_params([(3,), (0,)], [torch.float32])
    with pytest.raises(RuntimeError, match="cannot compute the infinity norm on an empty tensor"):
        fastclip.grad_stats(params, "inf", backend=backend)


def test_many_tiny_tensors(backend, seed):
    params = random_params([(7,)] * (40 if backend in ("triton", "cuda") else 500), [torch.float32, torch.float16])
    check_stats(params, backend)


def test_the_total_is_the_norm_of_the_per_tensor_norms(backend, seed):
    params = random_params([(n,) for n in sizes_for(backend) if n], [torch.float64])
    stats = fastclip.grad_stats(params, backend=backend)
    total = torch.linalg.vector_norm(stats.per_tensor_norms)
    tol = ulp(total.item(), torch.float64) * 8
    assert abs(stats.total_norm.item() - total.item()) <= tol


def test_an_inf_without_nan_gives_an_inf_total(backend):
    params = []
    for dtype in FLOAT_DTYPES:
        p = torch.nn.Parameter(torch.zeros(40, dtype=dtype))
        p.grad = torch.linspace(-1, 1, 40, dtype=torch.float64).to(dtype)
        p.grad[7] = -math.inf
        params.append(p)
    for norm_type in (1.0, 2.0, math.inf):
        stats = check_stats(params, backend, norm_type)
        assert stats.total_norm.item() == math.inf and stats.num_nonfinite.item() == len(FLOAT_DTYPES)
