"""clip_grad_norm_groups_ on every backend: torch's clip_grad_norm_ on each
group, all groups in one pass."""

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


def check_groups(groups, backend, max_norm, norm_type=2.0):
    """fastclip on copies of the groups against torch, group by group."""
    names = list(groups) if isinstance(groups, dict) else None
    members = list(groups.values()) if names else list(groups)
    ours = [clone_params(g) for g in members]
    ref = [clone_params(g) for g in members]
    arg = dict(zip(names, ours)) if names else ours
    norms = fastclip.clip_grad_norm_groups_(arg, max_norm, norm_type, backend=backend)
    all_grads = [p.grad for g in members for p in g if p.grad is not None]
    assert norms.dtype == norms_dtype(all_grads) and norms.shape == (len(members),)
    maxes = max_norm if isinstance(max_norm, (list, tuple, torch.Tensor)) else [max_norm] * len(members)
    for k, group in enumerate(members):
        grads = [p.grad for p in group if p.grad is not None]
        m = float(maxes[k])
        if not is_fused(backend):
            want = torch.nn.utils.clip_grad_norm_(ref[k], m, norm_type)
            assert_bitwise_equal(norms[k], want.to(norms.dtype))
        else:
            exact = reference_norm(grads, norm_type) if grads else 0.0
            torch_norm = torch.nn.utils.get_total_norm(grads, norm_type).double().item()
            wide = any(g.dtype == torch.float64 for g in grads)
            if math.isfinite(exact) and math.isfinite(torch_norm):
                tol = ulp(exact, torch.float64 if wide else torch.float32)
                assert abs(norms[k].item() - exact) <= abs(torch_norm - exact) + tol, (k, norms[k], exact)
            if grads:
                clip_like_torch([p.grad for p in ref[k] if p.grad is not None],
                                norms[k].to(torch.float64 if wide else torch.float32), m)  # fmt: skip
        for a, b in zip(ours[k], ref[k]):
            if a.grad is not None:
                assert_bitwise_equal(a.grad, b.grad)
    return norms


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_groups_like_torch_group_by_group(backend, dtype, norm_type, seed):
    sizes = [n for n in sizes_for(backend) if n or norm_type != math.inf]
    params = random_params([(n,) for n in sizes], [dtype], scale=0.05)
    groups = [params[:2], params[2:3], params[3:]]
    norms = [reference_norm([p.grad for p in g], norm_type) for g in groups]
    check_groups(groups, backend, sorted(norms)[1], norm_type)  # some groups clip, some not


def test_dict_of_groups_mixed_dtypes_and_none_grads(backend, seed):
    params = random_params([(5, 7), (3,), (), (40, 13), (9,), (2, 3)], FLOAT_DTYPES, with_none=(2,))
    norms = check_groups({"main": params[:3], "mtp": params[3:5], "head": params[5:]}, backend, [1.0, 0.5, 100.0])
    assert norms.dtype == torch.float64


def test_max_norm_as_a_tensor_and_an_empty_group(backend, seed):
    params = random_params([(30,), (4, 4), (7,)], [torch.float32])
    norms = check_groups([params[:1], [], params[1:]], backend, torch.tensor([0.1, 1.0, 0.2]))
    assert norms[1].item() == 0.0


def test_a_0_dim_max_norm_tensor_is_one_value_for_every_group(backend, seed):
    params = random_params([(30,), (4, 4), (7,)], [torch.float32])
    sizes = sorted(float(torch.cat([p.grad.reshape(-1) for p in g]).norm()) for g in (params[:1], params[1:]))
    m = (sizes[0] + sizes[1]) / 2  # one group clips, the other does not
    a, b = clone_params(params), clone_params(params)
    norms = fastclip.clip_grad_norm_groups_([a[:1], a[1:]], torch.tensor(m), backend=backend)
    assert_bitwise_equal(norms, fastclip.clip_grad_norm_groups_([b[:1], b[1:]], [m, m], backend=backend))
    assert_grads_bitwise_equal(a, b)


def test_overlapping_groups_raise_and_leave_grads(backend, seed):
    params = random_params([(30,), (4, 4)], [torch.float32])
    before = grads_of(params)
    with pytest.raises(ValueError, match="groups must be disjoint"):
        fastclip.clip_grad_norm_groups_([params, params[1:]], 0.1, backend=backend)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)


@pytest.mark.parametrize("bad", [[1.0], [1.0, 2.0, 3.0], torch.ones(3), "ab"])
def test_wrong_max_norm_raises_and_leaves_grads(backend, bad, seed):
    params = random_params([(30,), (4, 4)], [torch.float32])
    before = grads_of(params)
    with pytest.raises((ValueError, TypeError), match="max_norm"):
        fastclip.clip_grad_norm_groups_([params[:1], params[1:]], bad, backend=backend)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)


def test_error_if_nonfinite_raises_before_touching_any_group(backend, seed):
    params = random_params([(30,), (20,), (40,)], [torch.float32], scale=10.0)
    params[2].grad[0] = float("inf")
    before = grads_of(params)
    with pytest.raises(RuntimeError, match="is non-finite"):
        fastclip.clip_grad_norm_groups_([params[:2], params[2:]], 0.1, error_if_nonfinite=True, backend=backend)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)


@pytest.mark.parametrize("norm_type", [0.5, 3.0])
def test_other_norm_types_are_torchs(backend, norm_type, seed):
    params = random_params([(10,), (3, 3), (5,)], [torch.float32])
    ours, ref = clone_params(params), clone_params(params)
    norms = fastclip.clip_grad_norm_groups_([ours[:1], ours[1:]], 0.7, norm_type, backend=backend)
    a = torch.nn.utils.clip_grad_norm_(ref[:1], 0.7, norm_type)
    b = torch.nn.utils.clip_grad_norm_(ref[1:], 0.7, norm_type)
    assert_bitwise_equal(norms, torch.stack([a, b]))
    for p, q in zip(ours, ref):
        assert_bitwise_equal(p.grad, q.grad)


def test_a_parameter_twice_in_one_group_counts_twice_like_torch(backend, seed):
    p, q = random_params([(30,), (7,)], [torch.float32], scale=5.0)
    check_groups([[p, p], [q]], backend, 1.0)


def test_inf_norm_of_an_empty_grad_raises_torchs_error(backend):
    params = random_params([(3,), (0,)], [torch.float32])
    with pytest.raises(RuntimeError, match="cannot compute the infinity norm on an empty tensor"):
        fastclip.clip_grad_norm_groups_([params[:1], params[1:]], 1.0, "inf", backend=backend)


def test_no_groups(backend):
    norms = fastclip.clip_grad_norm_groups_([], 1.0, backend=backend)
    assert norms.shape == (0,)


def test_groups_sharing_grad_memory_raise_and_leave_grads(backend, seed):
    """Distinct parameters whose grads are one tensor, or overlapping views, in
    two groups: torch, group by group, would clip that memory twice."""
    a, b = random_params([(30,), (30,)], [torch.float32], scale=5.0)
    b.grad = a.grad
    clip = lambda ps: fastclip.clip_grad_norm_groups_({"x": ps[:1], "y": ps[1:]}, 0.1, backend=backend)  # noqa: E731
    assert_raises_leaving_grads(clip, [a, b], ValueError, "groups must be disjoint: group 'x' and group 'y' share")
    flat = torch.randn(60, device=a.device) * 5
    a.grad, b.grad = flat[:30], flat[25:55]
    assert_raises_leaving_grads(clip, [a, b], ValueError, "share gradient memory")
    a.grad, b.grad = flat[:30], flat[30:]  # adjacent views of one buffer (a flat grad buffer): disjoint
    check_groups([[a], [b]], backend, 0.1)
    norms = fastclip.clip_grad_norm_groups_([[a], [b]], 0.1, backend=backend)
    assert norms.shape == (2,)


def test_a_meta_grad_beside_others_raises_before_any_write(backend, seed):
    """The norms come back on the first grad's device: a meta grad's norm
    cannot be copied there, which is found before any grad is written."""
    if backend not in ("auto", "torch"):
        pytest.skip("a named fused backend refuses meta grads (BackendError)")
    params = random_params([(30,)], [torch.float32], scale=10.0)
    assert_a_meta_grad_raises_first(lambda ps: fastclip.clip_grad_norm_groups_([ps[:1], ps[1:]], 0.1, backend=backend), params)


def test_an_unwritable_grad_raises_before_any_write(backend, seed):
    params = with_unwritable_grad(random_params([(30,), (4, 4)], [torch.float32], scale=10.0))
    clip = lambda ps: fastclip.clip_grad_norm_groups_([ps[:2], ps[2:]], 0.1, backend=backend)  # noqa: E731
    assert_raises_leaving_grads(clip, params, RuntimeError, f"{UNWRITABLE}|cannot serve")


def test_a_0_dim_numpy_max_norm_is_one_value(backend, seed):
    np = pytest.importorskip("numpy")
    params = random_params([(30,), (4, 4), (5,)], [torch.float32], scale=3.0)
    ours, ref = clone_params(params), clone_params(params)
    norms = fastclip.clip_grad_norm_groups_([ours[:1], ours[1:]], np.array(0.5), backend=backend)
    want = fastclip.clip_grad_norm_groups_([ref[:1], ref[1:]], 0.5, backend=backend)
    assert_bitwise_equal(norms, want)
    for p, q in zip(ours, ref):
        assert_bitwise_equal(p.grad, q.grad)


def test_error_if_nonfinite_sees_an_fp16_groups_norm_as_torch_does(backend, seed):
    """A group of fp16 grads alone: torch's norm is fp16, inf above 65504, and
    torch raises; a group that also holds an fp32 grad has a float32 norm
    (fastclip's, finite here: the documented difference of clip_grad_norm_)."""
    params = random_params([(1000,), (20,), (30,)], [torch.float16, torch.float16, torch.float32])
    params[0].grad.fill_(3000.0)  # norm 94868
    before = grads_of(params)
    with pytest.raises(RuntimeError, match="is non-finite"):
        fastclip.clip_grad_norm_groups_([params[:2], params[2:]], 1.0, error_if_nonfinite=True, backend=backend)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)
    if backend != "torch":
        norms = fastclip.clip_grad_norm_groups_([[params[0], params[2]], params[1:2]], 1.0, error_if_nonfinite=True,
                                                backend=backend)  # fmt: skip
        assert torch.isfinite(norms).all() and norms[0] > 65504
