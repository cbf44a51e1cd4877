"""clip_grad_norm_per_tensor_ on every backend: for each grad, what
torch.nn.utils.clip_grad_norm_([p], ...) does, with fastclip's accuracy."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip

from .helpers import (
    assert_a_meta_grad_raises_first,
    UNWRITABLE,
    assert_raises_leaving_grads,
    with_unwritable_grad,
    FLOAT_DTYPES,
    assert_bitwise_equal,
    assert_grads_bitwise_equal,
    clone_params,
    grads_of,
    is_fused,
    reference_norm,
    ulp,
)
from .method_refs import clip_like_torch, norms_dtype, random_params, sizes_for

NORM_TYPES = [1.0, 2.0, math.inf]


def check_per_tensor(params, backend, max_norm, norm_type=2.0):
    """Run fastclip on copies of params and check every grad against its own reference:
    fused, the norm as accurate as torch's and the grad torch's clip with our norm;
    torch path, bit for bit torch's clip_grad_norm_([p]) one after the other."""
    ours, ref = clone_params(params), clone_params(params)
    norms = fastclip.clip_grad_norm_per_tensor_(ours, max_norm, norm_type, backend=backend)
    with_grads = [(i, p) for i, p in enumerate(params) if p.grad is not None]
    grads = [p.grad for _, p in with_grads]
    assert norms.dtype == norms_dtype(grads) and norms.shape == (len(grads),) and not norms.requires_grad
    maxes = max_norm if isinstance(max_norm, (list, tuple, torch.Tensor)) else [max_norm] * len(params)
    for k, (i, p) in enumerate(with_grads):
        m = float(maxes[i])
        q = ref[i]
        if not is_fused(backend):
            want = torch.nn.utils.clip_grad_norm_([q], m, norm_type)
            assert_bitwise_equal(norms[k], want.to(norms.dtype))
            assert_bitwise_equal(ours[i].grad, q.grad)
            continue
        exact = reference_norm([p.grad], norm_type)
        torch_norm = torch.nn.utils.get_total_norm([p.grad], norm_type).double().item()
        got = norms[k].item()
        if math.isfinite(exact) and math.isfinite(torch_norm):
            tol = ulp(exact, torch.float64 if p.grad.dtype == torch.float64 else torch.float32)
            assert abs(got - exact) <= abs(torch_norm - exact) + tol, (i, got, torch_norm, exact)
        # the grad: torch's clip with our norm (float32 unless float64, as fastclip clips)
        working = norms[k].to(torch.float64 if p.grad.dtype == torch.float64 else torch.float32)
        clip_like_torch([q.grad], working, m)
        assert_bitwise_equal(ours[i].grad, q.grad)
    return norms, ours


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_each_grad_clipped_by_its_own_norm(backend, dtype, norm_type, seed):
    sizes = [n for n in sizes_for(backend) if n or norm_type != math.inf]
    params = random_params([(n,) for n in sizes], [dtype], scale=0.05)
    # some grads clip, some do not: the max norm sits between their norms
    norms = sorted(reference_norm([p.grad], norm_type) for p in params)
    check_per_tensor(params, backend, norms[len(norms) // 2], norm_type)


def test_mixed_dtypes_shapes_and_none_grads(backend, seed):
    shapes = [(5, 7), (3,), (), (40, 13), (2, 3, 4), (0,), (9,)]
    params = random_params(shapes, FLOAT_DTYPES, with_none=(2, 5))
    norms, _ = check_per_tensor(params, backend, 1.0)
    assert norms.dtype == torch.float64  # a float64 grad among them


def test_max_norm_per_parameter(backend, seed):
    params = random_params([(30,), (4, 4), (7,), (11,)], [torch.float32], with_none=(2,))
    maxes = [0.5, 100.0, 3.0, 1e-3]  # the third belongs to a parameter without a grad
    check_per_tensor(params, backend, maxes)
    check_per_tensor(params, backend, torch.tensor(maxes))
    check_per_tensor(params, backend, tuple(maxes))


@pytest.mark.parametrize("with_none", [(), (2,)])
def test_a_0_dim_max_norm_tensor_is_one_value_for_every_grad(backend, with_none, seed):
    params = random_params([(30,), (4, 4), (7,), (11,)], [torch.float32], with_none=with_none)
    sizes = sorted(float(p.grad.norm()) for p in params if p.grad is not None)
    m = (sizes[0] + sizes[-1]) / 2  # some clip, some do not
    a, b = clone_params(params), clone_params(params)
    norms = fastclip.clip_grad_norm_per_tensor_(a, torch.tensor(m), backend=backend)
    assert_bitwise_equal(norms, fastclip.clip_grad_norm_per_tensor_(b, [m] * 4, backend=backend))
    assert_grads_bitwise_equal(a, b)


@pytest.mark.parametrize("bad", [[1.0, 2.0, 3.0], [1.0], torch.ones(3), torch.ones(2, 2), "xy", None, [1.0, "a"]])
def test_wrong_max_norm_raises_and_leaves_grads(backend, bad, seed):
    params = random_params([(30,), (4, 4)], [torch.float32])
    before = grads_of(params)
    with pytest.raises((ValueError, TypeError), match="max_norm"):
        fastclip.clip_grad_norm_per_tensor_(params, bad, backend=backend)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, "inf"])
def test_error_if_nonfinite_raises_before_touching_anything(backend, norm_type, seed):
    params = random_params([(30,), (20,), (40,)], [torch.float32])
    params[1].grad[3] = float("nan")
    before = grads_of(params)
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        fastclip.clip_grad_norm_per_tensor_(params, 0.1, norm_type, error_if_nonfinite=True, backend=backend)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)
    # without the flag: that grad's norm is NaN and it becomes NaN, the others are clipped as usual
    norms = fastclip.clip_grad_norm_per_tensor_(params, 0.1, norm_type, backend=backend)
    assert math.isnan(norms[1].item()) and torch.isnan(params[1].grad).all()
    assert torch.isfinite(norms[0]) and torch.isfinite(params[0].grad).all()


def test_inf_norm_of_an_empty_grad_raises_torchs_error(backend):
    params = random_params([(3,), (0,)], [torch.float32])
    before = grads_of(params)
    with pytest.raises(RuntimeError, match="cannot compute the infinity norm on an empty tensor"):
        fastclip.clip_grad_norm_per_tensor_(params, 1.0, "inf", backend=backend)
    assert_bitwise_equal(params[0].grad, before[0])


@pytest.mark.parametrize("norm_type", [0.5, 3.0, -math.inf, 0.0])
def test_other_norm_types_are_torchs(backend, norm_type, seed):
    params = random_params([(10,), (3, 3), (5,)], [torch.float32, torch.float64])
    ours, ref = clone_params(params), clone_params(params)
    norms = fastclip.clip_grad_norm_per_tensor_(ours, 0.7, norm_type, backend=backend)
    for k, q in enumerate(ref):
        want = torch.nn.utils.clip_grad_norm_([q], 0.7, norm_type)
        assert_bitwise_equal(norms[k], want.to(torch.float64))
    assert_grads_bitwise_equal(ours, ref)


def test_a_duplicated_grad_is_clipped_twice_in_turn_like_torch(backend, seed):
    p = random_params([(50,)], [torch.float32], scale=10.0)[0]
    ref = clone_params([p])[0]
    norms = fastclip.clip_grad_norm_per_tensor_([p, p], 1.0, backend=backend)
    first = torch.nn.utils.clip_grad_norm_([ref], 1.0)
    second = torch.nn.utils.clip_grad_norm_([ref], 1.0)
    assert_bitwise_equal(p.grad, ref.grad)
    assert_bitwise_equal(norms, torch.stack([first, second]))


def test_views_transposed_and_sliced(backend, seed):
    base, other = torch.randn(20, 30), torch.randn(6, 5).t().contiguous().t()

    def params_on(base, other):
        params = []
        for grad in (base.t(), base[:, ::3], base[2:7, 4:9], other):
            p = torch.nn.Parameter(torch.zeros(grad.shape))
            p.grad = grad
            params.append(p)
        return params

    check_per_tensor(params_on(base, other), backend, 0.5)  # on copies: each view its own grad
    # in place, on views of one tensor (they overlap): torch's loop, one parameter after the other
    base_ref, other_ref = base.clone(), other.clone()
    fastclip.clip_grad_norm_per_tensor_(params_on(base, other), 0.5, backend=backend)
    for p in params_on(base_ref, other_ref):
        torch.nn.utils.clip_grad_norm_([p], 0.5)
    assert_bitwise_equal(base, base_ref)
    assert_bitwise_equal(other, other_ref)


def test_many_tiny_tensors(backend, seed):
    count = 40 if backend in ("triton", "cuda") else 600
    params = random_params([(7,)] * count, [torch.float32, torch.bfloat16])
    check_per_tensor(params, backend, 0.8)


def test_no_grads(backend):
    norms = fastclip.clip_grad_norm_per_tensor_([torch.nn.Parameter(torch.ones(3))], 1.0, backend=backend)
    assert norms.shape == (0,) and norms.dtype == torch.float32


def test_a_single_tensor_and_a_generator(backend, seed):
    p = random_params([(25,)], [torch.float32], scale=3.0)[0]
    q = clone_params([p])[0]
    a = fastclip.clip_grad_norm_per_tensor_(p, 0.5, backend=backend)
    b = fastclip.clip_grad_norm_per_tensor_((x for x in [q]), 0.5, backend=backend)
    assert_bitwise_equal(a, b)
    assert_bitwise_equal(p.grad, q.grad)


def test_clipping_bumps_the_version_counter(backend, seed):
    p = random_params([(25,)], [torch.float32], scale=3.0)[0]
    before = p.grad._version
    fastclip.clip_grad_norm_per_tensor_([p], 0.01, backend=backend)
    assert p.grad._version > before


def test_a_meta_grad_beside_others_raises_before_any_write(backend, seed):
    """The norms come back on the first grad's device: a meta grad's norm
    cannot be copied there, which is found before any grad is written."""
    if backend not in ("auto", "torch"):
        pytest.skip("a named fused backend refuses meta grads (BackendError)")
    params = random_params([(30,)], [torch.float32], scale=10.0)
    assert_a_meta_grad_raises_first(lambda ps: fastclip.clip_grad_norm_per_tensor_(ps, 0.1, backend=backend), params)


def test_an_unwritable_grad_raises_before_any_write(backend, seed):
    params = with_unwritable_grad(random_params([(30,), (4, 4)], [torch.float32], scale=10.0))
    clip = lambda ps: fastclip.clip_grad_norm_per_tensor_(ps, 0.1, backend=backend)  # noqa: E731
    assert_raises_leaving_grads(clip, params, RuntimeError, f"{UNWRITABLE}|cannot serve")


@pytest.mark.parametrize("max_norm", [True, "0.5", "12"])
def test_max_norm_converted_as_torchs_float(backend, max_norm, seed):
    """torch takes float(max_norm): a bool or a numeric string is one value (not one per parameter)."""
    params = random_params([(30,), (4, 4)], [torch.float32], scale=3.0)
    ours, ref = clone_params(params), clone_params(params)
    norms = fastclip.clip_grad_norm_per_tensor_(ours, max_norm, backend=backend)
    want = torch.stack([torch.nn.utils.clip_grad_norm_([q], max_norm) for q in ref])
    torch.testing.assert_close(norms, want, rtol=1e-6, atol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend_name", [None, "torch"])
def test_complex128_norms_are_float64_like_torchs(backend_name, seed):
    p = torch.nn.Parameter(torch.zeros(6, dtype=torch.complex128))
    p.grad = torch.randn(6, dtype=torch.complex128) * (1 + 1e-12)
    norms = fastclip.clip_grad_norm_per_tensor_([p], 1e9, backend=backend_name)
    assert norms.dtype == torch.float64
    assert_bitwise_equal(norms[0], torch.linalg.vector_norm(p.grad))


def test_a_0_dim_numpy_max_norm_is_one_value(backend, seed):
    """torch's float(max_norm) takes a 0-dim numpy array."""
    np = pytest.importorskip("numpy")
    params = random_params([(30,), (4, 4)], [torch.float32], scale=3.0)
    ours, ref = clone_params(params), clone_params(params)
    norms = fastclip.clip_grad_norm_per_tensor_(ours, np.array(0.5), backend=backend)
    want = fastclip.clip_grad_norm_per_tensor_(ref, 0.5, backend=backend)
    assert_bitwise_equal(norms, want)
    assert_grads_bitwise_equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_error_if_nonfinite_sees_a_16_bit_norm_as_torch_does(backend, dtype, seed):
    """An fp16 grad's norm above 65504 is inf to torch (its norm is fp16), so
    torch's clip_grad_norm_([p], error_if_nonfinite=True) raises: so do we,
    though the float32 norm we return is finite.  bf16 holds that norm."""
    params = random_params([(1000,), (20,)], [dtype, torch.float32])
    params[0].grad.fill_(3000.0)  # norm 94868
    before = grads_of(params)
    clip = lambda: fastclip.clip_grad_norm_per_tensor_(params, 1.0, error_if_nonfinite=True, backend=backend)  # noqa: E731
    torch_raises = not torch.isfinite(torch.linalg.vector_norm(params[0].grad))
    assert torch_raises == (dtype == torch.float16)
    if torch_raises:
        with pytest.raises(RuntimeError, match="is non-finite"):
            clip()
        for p, g in zip(params, before):
            assert_bitwise_equal(p.grad, g)
    else:
        assert torch.isfinite(clip()).all()
