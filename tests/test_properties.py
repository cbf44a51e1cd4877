"""Property-based comparison with torch over random shapes, dtypes, layouts,
norm types, max_norm and clip values (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis")  # in the test extra; a lent GPU machine's image may lack it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastclip  # noqa: E402

from .helpers import (
    ALL_BACKENDS,
    assert_bitwise_equal,
    assert_grads_bitwise_equal,
    assert_same_outcome,
    check_clip_grad_norm,
    clone_params,
    outcome,
    reference_norm,
    takes_fused_path,
    norm_slack,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def grad_lists(draw):
    """Parameters with random grads: shapes with 0-3 dims (empty ones too),
    dtypes mixed or not, contiguous, transposed or sliced layouts."""
    n = draw(st.integers(0, 5))
    mixed = draw(st.booleans())
    dtype0 = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator(torch.get_default_device()).manual_seed(seed)
    params = []
    for _ in range(n):
        dtype = draw(st.sampled_from(DTYPES)) if mixed else dtype0
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
        layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
        scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
        if layout == "sliced":
            full = torch.randn((*shape[:-1], shape[-1] * 2 + 1) if shape else (3,), generator=gen, dtype=torch.float64)
            grad = full[..., 1::2] if shape else full[1]
        else:
            grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad = (grad * scale).to(dtype)
        if layout == "transposed" and grad.dim() >= 2:
            grad = grad.transpose(0, -1).contiguous().transpose(0, -1)
        p = torch.nn.Parameter(torch.zeros(grad.shape, dtype=dtype))
        p.grad = grad
        if draw(st.integers(0, 9)) == 0:
            p.grad = None
        params.append(p)
    return params


norm_types = st.one_of(
    st.sampled_from([1, 2, 2.0, "inf", float("inf"), 0, -1, 0.5, 3, -float("inf")]),
    st.floats(-4, 4, allow_nan=False),
)
max_norms = st.one_of(st.sampled_from([0.0, -1.0, float("inf"), 1e-6]), st.floats(1e-4, 1e4))


@SETTINGS
@given(params=grad_lists(), norm_type=norm_types, max_norm=max_norms, error_if_nonfinite=st.booleans())
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clip_grad_norm_matches_torch(backend, params, norm_type, max_norm, error_if_nonfinite):
    check_clip_grad_norm(params, backend, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite)


@SETTINGS
@given(params=grad_lists(), norm_type=norm_types)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_get_total_norm_matches_torch(backend, params, norm_type):
    grads = [p.grad for p in params if p.grad is not None]
    got = outcome(fastclip.get_total_norm, grads, norm_type, backend=backend)
    want = outcome(torch.nn.utils.get_total_norm, grads, norm_type)
    assert_same_outcome(got, want)
    if got[0] == "ok":
        ours, theirs = got[1], want[1]
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and ours.device == theirs.device
        if not takes_fused_path(backend, params, norm_type):
            assert_bitwise_equal(ours, theirs)
            return
        exact = reference_norm(grads, norm_type)
        if math.isfinite(exact) and math.isfinite(theirs.item()):
            ours_err, torch_err = abs(ours.double().item() - exact), abs(theirs.double().item() - exact)
            assert ours_err <= torch_err + norm_slack(exact, ours.dtype, backend)


@SETTINGS
@given(
    params=grad_lists(),
    clip_value=st.one_of(st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -1.0, 1e5, 1e39]), st.floats(-10, 10)),
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clip_grad_value_matches_torch_bit_for_bit(backend, params, clip_value):
    ours, ref = clone_params(params), clone_params(params)
    got = outcome(fastclip.clip_grad_value_, ours, clip_value, backend=backend)
    want = outcome(torch.nn.utils.clip_grad_value_, ref, clip_value)
    assert_same_outcome(got, want)
    if got[0] == "raise":
        if backend != "torch":  # fastclip checks every dtype before writing; torch may have clamped some
            assert_grads_bitwise_equal(ours, params)
        return
    assert_grads_bitwise_equal(ours, ref)


@SETTINGS
@given(params=grad_lists(), total=st.floats(0, 1e6) | st.sampled_from([float("nan"), float("inf")]), max_norm=max_norms)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clip_grads_with_norm_matches_torch_bit_for_bit(backend, params, total, max_norm):
    ours, ref = clone_params(params), clone_params(params)
    for dtype in (torch.float32, torch.float16, torch.float64):
        t = torch.tensor(total, dtype=dtype)
        fastclip.clip_grads_with_norm_(ours, max_norm, t, backend=backend)
        torch.nn.utils.clip_grads_with_norm_(ref, max_norm, t)
        assert_grads_bitwise_equal(ours, ref)
