"""adaptive_clip_grad_ on every backend: timm's AGC (units are dim-0 slices),
against a float64-norm reference bit for bit, and against timm itself."""

from __future__ import annotations

import math
import re
import sys
import types

import pytest
import torch

import fastclip

from .helpers import (
    FLOAT_DTYPES,
    UNWRITABLE,
    assert_bitwise_equal,
    assert_raises_leaving_grads,
    clone_params,
    grads_of,
    interpreted,
    is_fused,
    with_unwritable_grad,
)
from .method_refs import agc_reference, load_timm_agc, random_params

TIMM = load_timm_agc()
needs_timm = pytest.mark.skipif(TIMM is None, reason="timm is not installed (pip install --no-deps timm)")


def shapes_for(backend: str) -> list:
    """Linear and conv weights, biases, a scalar, empty ones, single-row ones."""
    if interpreted(backend):
        return [(6, 40), (5, 3, 3, 3), (40,), (), (3, 0), (0, 4), (1, 50), (7, 300)]
    return [(64, 300), (32, 16, 3, 3), (300,), (), (3, 0), (0, 4), (1, 500), (9, 5000), (2, 40_000)]


def pairs_of(params):
    return [(p.detach(), p.grad) for p in params if p.grad is not None]


def _kept_units(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Boolean index of the units (dim-0 slices, or the whole tensor) the reference left as they were."""
    same = (new == old) | (torch.isnan(new) & torch.isnan(old))
    if new.dim() <= 1:
        return torch.tensor(bool(same.all())).expand(new.shape) if new.dim() else same
    return same.flatten(1).all(dim=1)


def check_agc(params, backend, clip_factor=0.01, eps=1e-3, norm_type=2.0, reference=True):
    """fastclip on copies against the float64-norm reference (fused) or timm's loop (torch path)."""
    ours, ref = clone_params(params), clone_params(params)
    assert fastclip.adaptive_clip_grad_(ours, clip_factor, eps, norm_type, backend=backend) is None
    if is_fused(backend) and float(norm_type) in (1.0, 2.0, math.inf):
        want = agc_reference(pairs_of(ref), clip_factor, eps, float(norm_type))
        originals = [p.grad for p in params if p.grad is not None]
        for p, w, g in zip([p for p in ours if p.grad is not None], want, originals):
            if p.grad.dtype == torch.float64 or p.dtype == torch.float64:  # float64 sums may differ in the last bit
                torch.testing.assert_close(p.grad, w, rtol=1e-13, atol=0)
            elif p.grad.dtype in (torch.float16, torch.bfloat16) or p.dtype in (torch.float16, torch.bfloat16):
                # fp16/bf16 units sum in float32: the float32 norm may be an ulp off the float64 one,
                # and a clipped element then an ulp off; units that do not clip keep every bit
                eps16 = max(torch.finfo(p.grad.dtype).eps, torch.finfo(p.dtype).eps)
                subnormal_ulp = torch.finfo(p.grad.dtype).tiny * torch.finfo(p.grad.dtype).eps  # (an ulp below tiny)
                torch.testing.assert_close(p.grad, w, rtol=eps16, atol=subnormal_ulp)
                kept = _kept_units(w, g)
                assert_bitwise_equal(p.grad[kept], g[kept])
            else:
                assert_bitwise_equal(p.grad, w)
    else:  # torch's path is timm's code: timm's own function gives the same bits
        if TIMM is None:
            pytest.skip("timm is not installed (pip install --no-deps timm)")
        TIMM.adaptive_clip_grad(ref, clip_factor, eps, norm_type)
        assert len(ours) == len(ref)
        for p, q in zip(ours, ref):
            if p.grad is not None:
                assert_bitwise_equal(p.grad, q.grad)
    return ours


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_units_clip_like_the_reference(backend, dtype, norm_type, seed):
    shapes = [s for s in shapes_for(backend) if norm_type != math.inf or 0 not in s[1:] and s != (0,)]
    params = random_params(shapes, [dtype], scale=0.05)
    # a clip factor under which about half the units clip
    check_agc(params, backend, clip_factor=0.03, norm_type=norm_type)


def test_mixed_dtypes_and_a_float32_weight_with_a_bfloat16_grad(backend, seed):
    params = random_params(shapes_for(backend), FLOAT_DTYPES, with_none=(2,))
    p = torch.nn.Parameter(torch.randn(5, 30))
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # torch >= 2.10 checks a grad's dtype against its parameter's
    p.grad = torch.randn(5, 30).to(torch.bfloat16)
    check_agc(params + [p], backend, clip_factor=0.05)


@pytest.mark.parametrize("clip_factor, eps", [(0.01, 1e-3), (1.0, 1e-3), (1e-6, 1.0), (0.5, 0.0), (0.0, 1e-3)])
def test_clip_factor_and_eps(backend, clip_factor, eps, seed):
    params = random_params(shapes_for(backend), [torch.float32], scale=0.1)
    params[0].data[2].zero_()  # a unit whose weight norm is below eps
    check_agc(params, backend, clip_factor=clip_factor, eps=eps)


@needs_timm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_close_to_timm_itself(backend, dtype, seed):
    params = random_params(shapes_for(backend), [dtype], scale=0.05)
    with torch.no_grad():  # a unit whose weight norm is below eps: its limit is clip_factor * eps
        params[0][1].zero_()
        params[1][2, 0, 0, 0] = 1e-5
        params[1][2, 1:].zero_()
    ours, theirs = clone_params(params), clone_params(params)
    fastclip.adaptive_clip_grad_(ours, 0.03, backend=backend)
    TIMM.adaptive_clip_grad(theirs, 0.03)
    clipped = 0
    for p, q, orig in zip(ours, theirs, params):
        if p.grad is None:
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
        clipped += not torch.equal(q.grad, orig.grad)
    assert clipped > 0  # the comparison saw clipping


@needs_timm
@pytest.mark.parametrize("norm_type", [3.0, 0.5])
def test_other_norm_types_are_timms(backend, norm_type, seed):
    params = random_params(shapes_for(backend)[:4], [torch.float32], scale=0.05)
    ours, theirs = clone_params(params), clone_params(params)
    fastclip.adaptive_clip_grad_(ours, 0.03, norm_type=norm_type, backend=backend)
    TIMM.adaptive_clip_grad(theirs, 0.03, norm_type=norm_type)
    for p, q in zip(ours, theirs):
        assert_bitwise_equal(p.grad, q.grad)


def test_unclipped_units_keep_their_bits(backend, seed):
    """Only the units that clip are written: a unit below its limit keeps its
    signed zeros bit for bit (x * 1 would keep them too, x + 0 would not)."""
    w = torch.nn.Parameter(torch.ones(5, 64))
    g = torch.randn(5, 64) * 1e-4
    g[0, 3], g[0, 7], g[3, :5] = -0.0, 0.0, -0.0  # units that do not clip
    g[1, 5] = float("nan")
    g[2] *= 1e6  # this unit clips
    w.grad = g.clone()
    fastclip.adaptive_clip_grad_([w], 0.01, backend=backend)
    for unit in (0, 3, 4):
        assert_bitwise_equal(w.grad[unit], g[unit])
    assert torch.isnan(w.grad[1]).all()  # a NaN unit norm clips the whole unit to NaN, as timm's torch.where does
    assert w.grad[2].norm().item() == pytest.approx(0.01 * 8.0, rel=1e-5)  # ‖W_2‖ = 8


def test_channels_last_and_transposed_and_sliced(backend, seed):
    conv_w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    conv = torch.nn.Parameter(conv_w)
    conv.grad = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last) * 0.1
    lin = torch.nn.Parameter(torch.randn(20, 12))
    lin.grad = (torch.randn(12, 20) * 0.1).t()  # a transposed grad, weight contiguous
    base = torch.randn(10, 30) * 0.1
    sliced = torch.nn.Parameter(torch.randn(10, 10))
    sliced.grad = base[:, ::3]
    ours = check_agc([conv, lin, sliced], backend, clip_factor=0.05)  # on copies
    assert ours[1].grad.stride() == lin.grad.stride()  # written back into the same layout
    # in place: the sliced grad's columns are written, the columns between them kept
    outside = base.clone()
    fastclip.adaptive_clip_grad_([conv, lin, sliced], 0.05, backend=backend)
    assert_bitwise_equal(sliced.grad, ours[2].grad)
    keep = torch.ones(30, dtype=torch.bool)
    keep[::3] = False
    assert_bitwise_equal(base[:, keep], outside[:, keep])


def test_the_one_call_gather_gives_the_general_paths_bits(backend, seed, monkeypatch):
    """Plain dense parameters take the fast gather (grads, weights and units
    described in C++, methods/agc.py's _fast_path); it must give the bits of
    the general Python path, which is what every other layout takes: mixed
    dtypes, a weight of another dtype than its grad, parameters without a
    grad, scalars, empty and single-row tensors.  A parameter that is a
    non-contiguous view goes to the general path."""
    from fastclip import _ext
    from fastclip.methods import agc

    params = random_params(shapes_for(backend), FLOAT_DTYPES, with_none=(2,), scale=0.05)
    p = torch.nn.Parameter(torch.randn(5, 30))
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None
    p.grad = torch.randn(5, 30).to(torch.bfloat16)
    params.append(p)
    real, tables = _ext.cpu.agc_table, []
    monkeypatch.setattr(_ext.cpu, "agc_table", lambda *a: tables.append(real(*a)) or tables[-1])
    fast, general = clone_params(params), clone_params(params)
    fastclip.adaptive_clip_grad_(fast, 0.03, backend=backend)
    assert [t is not None for t in tables] == ([] if backend == "torch" else [True])
    monkeypatch.setattr(_ext.cpu, "agc_table", lambda *a: None)
    fastclip.adaptive_clip_grad_(general, 0.03, backend=backend)
    for a, b in zip(fast, general):
        if a.grad is not None:
            assert_bitwise_equal(a.grad, b.grad)
    assert any(not torch.equal(a.grad, q.grad) for a, q in zip(fast, params) if a.grad is not None)  # some clipped

    monkeypatch.setattr(_ext.cpu, "agc_table", lambda *a: tables.append(real(*a)) or tables[-1])
    tables.clear()
    view = torch.nn.Parameter(torch.randn(30, 6).t())  # a transposed weight, its grad contiguous
    view.grad = torch.randn(6, 30) * 0.1
    check_agc([view] + params[:2], backend, clip_factor=0.05)
    assert tables == ([] if backend == "torch" else [None])


def test_a_norm_type_float_cannot_hold_gives_the_general_paths_error(backend):
    """(the fast path converts norm_type first: it must not raise before the general path would)"""
    with pytest.raises(AttributeError):
        fastclip.adaptive_clip_grad_([object()], 0.01, 1e-3, 10**400, backend=backend)


def test_inf_norm_of_an_empty_unit_raises_torchs_error(backend):
    for shape, match in (((0,), "on an empty tensor"), ((3, 0), "on the dimension 1because"),
                         ((3, 4, 0), "on the dimension 2because")):  # fmt: skip
        params = random_params([(5,), shape], [torch.float32])
        before = grads_of(params)
        with pytest.raises(RuntimeError, match=match):
            fastclip.adaptive_clip_grad_(params, norm_type="inf", backend=backend)
        assert_bitwise_equal(params[0].grad, before[0])


@needs_timm
def test_a_duplicated_parameter_is_clipped_twice_like_timm(backend, seed):
    p = random_params([(6, 30)], [torch.float32], scale=10.0)[0]
    ref = clone_params([p])[0]
    fastclip.adaptive_clip_grad_([p, p], 0.01, backend=backend)
    TIMM.adaptive_clip_grad([ref, ref], 0.01)
    torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=0)


def test_a_single_tensor_and_a_generator(backend, seed):
    p = random_params([(6, 30)], [torch.float32], scale=1.0)[0]
    q = clone_params([p])[0]
    fastclip.adaptive_clip_grad_(p, backend=backend)
    fastclip.adaptive_clip_grad_((x for x in [q]), backend=backend)
    assert_bitwise_equal(p.grad, q.grad)


@needs_timm
def test_patch_routes_timms_agc(monkeypatch, seed):
    """fastclip.patch() points timm's adaptive_clip_grad (timm.utils,
    timm.utils.agc, timm.utils.clip_grad) at fastclip when timm is loaded, so
    dispatch_clip_grad(..., mode='agc') clips with it."""
    import importlib.util

    spec = importlib.util.find_spec("timm")
    root = list(spec.submodule_search_locations)[0]
    # timm's own package does not import here (torchvision): stand-in modules with its files' functions
    agc = load_timm_agc()
    clip_grad = types.ModuleType("timm.utils.clip_grad")
    clip_grad.__file__ = f"{root}/utils/clip_grad.py"
    source = open(clip_grad.__file__).read().replace("from timm.utils.agc import adaptive_clip_grad", "")
    clip_grad.adaptive_clip_grad = agc.adaptive_clip_grad
    exec(compile(source, clip_grad.__file__, "exec"), clip_grad.__dict__)  # noqa: S102 - timm's own file
    utils = types.ModuleType("timm.utils")
    utils.adaptive_clip_grad = agc.adaptive_clip_grad
    utils.dispatch_clip_grad = clip_grad.dispatch_clip_grad
    for name, module in (("timm", types.ModuleType("timm")), ("timm.utils", utils), ("timm.utils.agc", agc),
                         ("timm.utils.clip_grad", clip_grad)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    import fastclip.methods.agc as ours

    calls = []
    real = ours.adaptive_clip_grad_
    monkeypatch.setattr(ours, "adaptive_clip_grad_", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    originals = {name: sys.modules[name].adaptive_clip_grad for name in ("timm.utils", "timm.utils.agc")}
    params = random_params([(6, 30), (30,)], [torch.float32], scale=1.0)
    ref = clone_params(params)
    with fastclip.patched():
        assert fastclip.is_patched()
        assert all(sys.modules[n].adaptive_clip_grad is not f for n, f in originals.items())
        clip_grad.dispatch_clip_grad(params, 0.02, mode="agc")  # timm's dispatcher, unchanged
        utils.adaptive_clip_grad(params, 0.03, 1e-2)
    assert calls == [(0.02, 1e-3, 2.0), (0.03, 1e-2, 2.0)]
    real(ref, 0.02)
    real(ref, 0.03, 1e-2)
    for p, q in zip(params, ref):
        assert_bitwise_equal(p.grad, q.grad)
    # unpatched: timm's own functions again
    assert all(sys.modules[n].adaptive_clip_grad is f for n, f in originals.items())
    assert clip_grad.adaptive_clip_grad is agc.adaptive_clip_grad


@needs_timm
def test_frobenius_norm_type_is_timms(backend, seed):
    """timm hands norm_type to Tensor.norm, which takes 'fro' (for units of at
    most two dims): so does fastclip (torch's path), with torch's error for
    more, raised before any grad is written."""
    params = random_params([(7,), (5, 9), (4, 3, 6), (3,)], [torch.float32], scale=0.05)
    ours, theirs = clone_params(params), clone_params(params)
    fastclip.adaptive_clip_grad_(ours, 0.03, norm_type="fro", backend=backend)
    TIMM.adaptive_clip_grad(theirs, 0.03, norm_type="fro")
    for p, q in zip(ours, theirs):
        assert_bitwise_equal(p.grad, q.grad)
    params += random_params([(2, 3, 4, 5)], [torch.float32])
    with pytest.raises(RuntimeError) as want:
        TIMM.adaptive_clip_grad(clone_params(params), 0.03, norm_type="fro")
    clip = lambda ps: fastclip.adaptive_clip_grad_(ps, 0.03, norm_type="fro", backend=backend)  # noqa: E731
    assert_raises_leaving_grads(clip, params, RuntimeError, re.escape(str(want.value)))


def test_an_unwritable_grad_raises_before_any_write(backend, seed):
    params = with_unwritable_grad(random_params([(30,), (4, 4)], [torch.float32], scale=10.0))
    clip = lambda ps: fastclip.adaptive_clip_grad_(ps, 0.01, backend=backend)  # noqa: E731
    assert_raises_leaving_grads(clip, params, RuntimeError, f"{UNWRITABLE}|cannot serve")


@needs_timm
def test_a_nan_eps_is_timms(backend, seed):
    """timm's clamp_(min=nan) makes every max_norm NaN: every grad becomes NaN."""
    params = random_params([(6, 30), (40,)], [torch.float32])
    ref = clone_params(params)
    fastclip.adaptive_clip_grad_(params, 0.01, math.nan, backend=backend)
    TIMM.adaptive_clip_grad(ref, 0.01, math.nan)
    for p, q in zip(params, ref):
        assert_bitwise_equal(p.grad, q.grad)
    assert all(torch.isnan(p.grad).all() for p in params)


@needs_timm
@pytest.mark.parametrize("shared", ["one grad", "row views"])
def test_grads_that_share_memory_are_clipped_in_turn_like_timm(backend, shared, seed):
    """timm's loop reads each grad after the parameters before it were
    clipped: one grad on two parameters with different weights is clipped
    by the second weight's bound after the first's."""
    weights = [torch.randn(4, 5, dtype=torch.float64).float() * s for s in (0.1, 100.0)]
    params = [torch.nn.Parameter(w) for w in weights]
    buffer = torch.randn(4, 5, dtype=torch.float64).float()
    if shared == "one grad":
        params[0].grad = params[1].grad = buffer
    else:  # rows 0-2 and rows 1-3 of one buffer
        params = [torch.nn.Parameter(w[:3].clone()) for w in weights]
        params[0].grad, params[1].grad = buffer[:3], buffer[1:]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_buffer = buffer.clone()
    ref[0].grad, ref[1].grad = (ref_buffer, ref_buffer) if shared == "one grad" else (ref_buffer[:3], ref_buffer[1:])
    fastclip.adaptive_clip_grad_(params, 0.01, backend=backend)
    TIMM.adaptive_clip_grad(ref, 0.01)
    assert_bitwise_equal(buffer, ref_buffer)


@needs_timm
def test_a_unit_norm_beyond_the_grad_dtype_clips_where_timm_zeroes(backend):
    """timm's fp16 unit norm above 65504 is inf, its coefficient max_norm / inf
    = 0, and the unit becomes zeros; fastclip's norms are float32 there, so
    the unit is clipped to max_norm (the README's deliberate difference)."""
    p = torch.nn.Parameter(torch.ones(2, 100, dtype=torch.float16))
    p.grad = torch.full((2, 100), 1e4, dtype=torch.float16)  # unit norms 1e5
    ref = clone_params([p])[0]
    fastclip.adaptive_clip_grad_([p], backend=backend)
    TIMM.adaptive_clip_grad([ref])
    assert (ref.grad == 0).all()
    if backend == "torch":  # timm's own arithmetic
        assert_bitwise_equal(p.grad, ref.grad)
    else:
        unit_norms = p.grad.float().norm(dim=1)
        torch.testing.assert_close(unit_norms, torch.full((2,), 0.1), rtol=2e-3, atol=0)  # 0.01 * ||W_i|| = 0.1


def _exact_agc(w: torch.Tensor, g: torch.Tensor, clip_factor, eps, norm_type) -> torch.Tensor:
    """timm's formula in float64 from the float64 values (the exact result)."""
    from fastclip.methods.agc import unitwise_norm  # (timm's)

    w, g = w.detach().double(), g.double()
    max_norm = unitwise_norm(w, norm_type).clamp(min=eps) * clip_factor
    grad_norm = unitwise_norm(g, norm_type)
    return torch.where(grad_norm < max_norm, g, g * (max_norm / grad_norm.clamp(min=1e-6)))


@needs_timm
@pytest.mark.parametrize(
    "dtype, norm_type", [(torch.float16, 2.0), (torch.bfloat16, 2.0), (torch.float16, 1.0), (torch.float32, 1.0)]
)
def test_a_few_ulps_from_timm_and_no_further_from_exact(backend, dtype, norm_type, seed):
    """README: an fp16/bf16 unit's result differs from timm's by a few ulps of
    its dtype (timm rounds its norms and coefficient to the grads' dtype,
    fastclip's are float32/float64), an fp32 one by timm's float32 rounding
    of the norms (relative 1e-5 for L1 units of 40000), and neither is
    further from the float64-exact result than timm's."""
    params = random_params(shapes_for(backend), [dtype], scale=0.05)
    ours, theirs = clone_params(params), clone_params(params)
    fastclip.adaptive_clip_grad_(ours, 0.03, norm_type=norm_type, backend=backend)
    TIMM.adaptive_clip_grad(theirs, 0.03, norm_type=norm_type)
    rtol = 1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    our_error = timm_error = 0.0
    for p, q, orig in zip(ours, theirs, params):
        if p.grad is None or p.grad.numel() == 0:
            continue
        torch.testing.assert_close(p.grad.double(), q.grad.double(), rtol=rtol, atol=torch.finfo(dtype).tiny)
        exact = _exact_agc(orig, orig.grad, 0.03, 1e-3, norm_type)
        our_error += (p.grad.double() - exact).abs().sum().item()
        timm_error += (q.grad.double() - exact).abs().sum().item()
    assert our_error <= timm_error * (1 + 1e-9)


@needs_timm
@pytest.mark.parametrize("name", ["2", "1", "inf"])
def test_a_numeric_norm_type_string_is_that_number(backend, name, seed):
    """README: norm_type may be a numeric string (timm hands it to
    Tensor.norm, which takes it for a matrix norm and raises)."""
    params = random_params(shapes_for(backend)[:3], [torch.float32], scale=0.05)
    ours, by_number = clone_params(params), clone_params(params)
    fastclip.adaptive_clip_grad_(ours, 0.03, norm_type=name, backend=backend)
    fastclip.adaptive_clip_grad_(by_number, 0.03, norm_type=float(name), backend=backend)
    for p, q in zip(ours, by_number):
        assert_bitwise_equal(p.grad, q.grad)
    with pytest.raises(RuntimeError):
        TIMM.adaptive_clip_grad(clone_params(params), 0.03, norm_type=name)
