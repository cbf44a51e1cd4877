"""Comparisons of fastclip with torch.nn.utils used across the test files."""

from __future__ import annotations

import contextlib
import math
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
import torch

import fastclip
from fastclip._dispatch import FUSED_BACKENDS
from fastclip._work import collect
from fastclip.backends.base import FUSED_NORM_KINDS
from fastclip.backends.cuda_backend import emulating
from fastclip.backends.triton_backend import interpreting

# Every backend usable here, plus "auto".  The contract suite runs against each.
FUSED = [b for b in fastclip.available_backends() if b != "torch"]
ALL_BACKENDS = ["auto", *FUSED, "torch"]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def is_fused(backend: str) -> bool:
    """True if `backend` takes plain CPU grads through fastclip's own kernels."""
    return backend in FUSED or (backend == "auto" and "cpu" in FUSED)


def gpu_only(backend: str) -> bool:
    """True for a backend that serves only CUDA tensors here: the contract
    suite runs it with CUDA as torch's default device (see conftest)."""
    return (backend == "cuda" and not emulating()) or (backend == "triton" and not interpreting())


def interpreted(backend: str) -> bool:
    """True for the Triton backend under TRITON_INTERPRET=1 and the CUDA
    backend under FASTCLIP_CUDA_EMULATE=1: slow, so tests keep sizes small."""
    return (backend == "triton" and interpreting()) or (backend == "cuda" and emulating())


def make_params(shapes, dtype=torch.float32, scale=1.0, generator=None, device="cpu"):
    """Zero parameters on `device` with random grads (drawn on the CPU, so a seed gives the same grads anywhere)."""
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        p.grad = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        params.append(p)
    return params


def clone_grad(g):
    """A copy with the same sizes, strides and storage offset (a copied base for views)."""
    if g is None or g.layout != torch.strided or g.device.type == "meta":
        return None if g is None else g.clone()
    copy = torch.empty(0, dtype=g.dtype, device=g.device)
    copy.set_(g.untyped_storage().clone(), g.storage_offset(), g.size(), g.stride())
    return copy if type(g) is torch.Tensor else copy.as_subclass(type(g))  # keep tensor subclasses


def clone_params(params):
    """Copies of the parameters and their grads; a parameter listed twice is
    copied once and listed twice (the copies keep the duplicates)."""
    out, copies = [], {}
    for p in params:
        if id(p) not in copies:
            q = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            if p.grad is not None and p.grad.dtype != p.dtype and hasattr(q, "grad_dtype"):
                q.grad_dtype = None  # torch >= 2.10 checks a grad's dtype against its parameter's
            q.grad = clone_grad(p.grad)
            copies[id(p)] = q
        out.append(copies[id(p)])
    return out


def grads_of(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor):
    """Same dtype, shape and bits (any NaN equals any NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), "NaN positions differ"
    a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    # flat: nonzero() of a 0-dim tensor has no columns, so a 0-dim mismatch would show no elements
    a, b = a.reshape(-1), b.reshape(-1)
    ia = a.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])
    ib = b.view(ia.dtype)
    bad = (ia != ib).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} elements differ, first at flat {int(bad[0])}: {a[bad[0]]} vs {b[bad[0]]}"


def assert_grads_bitwise_equal(params_a, params_b):
    assert len(params_a) == len(params_b)
    for pa, pb in zip(params_a, params_b):
        assert (pa.grad is None) == (pb.grad is None)
        if pa.grad is not None:
            assert_bitwise_equal(pa.grad, pb.grad)


def reference_norm(tensors, norm_type) -> float:
    """The p-norm of all elements in float64: correctly rounded for float64
    inputs and p in {1, 2} (exact rational arithmetic), else torch's float64
    norm, which is far more precise than any lower-precision input."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    p = float(norm_type)
    if p not in (1.0, 2.0) or all(t.dtype != torch.float64 for t in tensors) or not torch.isfinite(flat).all():
        return torch.linalg.vector_norm(flat, p).item()
    values = flat.tolist()
    if p == 1.0:
        return math.fsum(abs(v) for v in values)
    total = sum(Fraction(v) ** 2 for v in values)
    with localcontext() as ctx:
        ctx.prec = 60
        return float((Decimal(total.numerator) / Decimal(total.denominator)).sqrt())


def outcome(fn, *args, **kwargs):
    """("ok", result) or ("raise", exception type, message)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - comparing whatever torch raises
        return ("raise", type(exc), str(exc))


def assert_same_outcome(ours, theirs):
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "raise":
        assert ours[1] is theirs[1], (ours, theirs)
        assert ours[2] == theirs[2], (ours, theirs)


def ulp(value: float, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.eps * max(abs(value), info.tiny)


def norm_slack(exact: float, dtype: torch.dtype, backend: str) -> float:
    """How far beyond torch's error fastclip's norm may be: an ulp of the
    result dtype; two for a float64 total on the GPU kernels, whose float64
    sums are plain tree sums (README; tests/test_precision.py)."""
    gpu_kernels = backend in ("triton", "cuda")
    return (2 if gpu_kernels and dtype == torch.float64 else 1) * ulp(exact, dtype)


def takes_fused_path(backend: str, params, norm_type=2.0) -> bool:
    """Whether fastclip will run this call through its own kernels."""
    if not is_fused(backend):
        return False
    try:
        kind = FUSED_NORM_KINDS.get(float(norm_type))
    except (TypeError, ValueError):
        return False
    grads = [p.grad for p in params if p.grad is not None]
    return kind is not None and bool(grads) and collect(grads, False)[1] is not None


def clip_total_for(params, norm_type, max_norm, backend="cpu") -> torch.Tensor:
    """The total fastclip's fused path clips with (float32 for fp16/bf16 grads)."""
    grads = [p.grad for p in params if p.grad is not None]
    work = collect(grads, False)[1]
    fused = FUSED_BACKENDS["cpu" if backend == "auto" else backend]
    total, _ = fused.clip_details(work, FUSED_NORM_KINDS[float(norm_type)], float(max_norm))
    dtype = torch.float64 if work.result_dtype == torch.float64 else torch.float32
    return torch.tensor(total, dtype=dtype)


def half_norm_overflowed(params, norm_type, total: torch.Tensor) -> bool:
    """True if some fp16/bf16 grad's own norm is beyond its dtype's range while
    the exact total of all grads, and ours, are finite in ours's dtype."""
    grads = [p.grad for p in params if p.grad is not None]
    if not math.isfinite(total.item()):
        return False
    for g in grads:
        if g.dtype in (torch.float16, torch.bfloat16) and g.numel():
            if reference_norm([g], norm_type) > torch.finfo(g.dtype).max:
                return math.isfinite(reference_norm(grads, norm_type))
    return False


def check_total_norm(total: torch.Tensor, torch_total: torch.Tensor, grads, norm_type, backend: str) -> None:
    """fastclip's fused total norm against the exact one (float64 reference):
    NaN or inf as the exact norm is; where torch's is finite, at least as
    accurate; where torch's sum overflowed and the exact norm is finite in the
    result dtype, finite and accurate to the precision of fastclip's sums."""
    exact, value = reference_norm(grads, norm_type), total.double().item()
    if not math.isfinite(exact):  # inf or NaN elements: NaN if any is NaN, else inf (as torch)
        assert math.isnan(value) if math.isnan(exact) else value == math.inf, (value, exact)
    elif math.isfinite(torch_total.item()):
        ours_err, torch_err = abs(value - exact), abs(torch_total.double().item() - exact)
        assert ours_err <= torch_err + norm_slack(exact, total.dtype, backend), (value, torch_total.item(), exact)
    elif math.isinf(torch.tensor(exact).to(total.dtype).item()):  # beyond the result dtype's range
        assert value == math.inf, (value, exact)
    else:  # torch's sum overflowed where the exact norm is finite: ours must not
        halves = any(g.dtype in (torch.float16, torch.bfloat16) for g in grads)
        power = exact ** (2 if float(norm_type) == 2.0 else 1)
        if halves and backend in ("triton", "cuda") and power > torch.finfo(torch.float32).max / 1e3:
            assert value == math.inf or math.isclose(value, exact, rel_tol=2.0**-20), (value, exact)
            return  # (README: the GPU kernels sum fp16/bf16 in float32 within a unit, as torch does)
        # fp16/bf16 are summed in float32 blocks folded into float64: float32-level accuracy
        slack = max(norm_slack(exact, total.dtype, backend), abs(exact) * 2.0**-20 if halves else 0.0)
        assert abs(value - exact) <= slack, (value, exact)


def check_clip_grad_norm(params, backend, max_norm, norm_type=2.0, foreach=None, error_if_nonfinite=False):
    """Run fastclip and torch on copies of `params` and check fastclip's contract:

    * same outcome (result or exception type and message);
    * same return dtype, device, shape, requires_grad;
    * fused path: the norm at least as accurate as torch's against float64, and
      the grads bit-identical to what torch does with fastclip's clip total;
    * torch path: everything bit-identical.
    Returns (our total, our params).
    """
    ours, ref = clone_params(params), clone_params(params)
    fused = takes_fused_path(backend, params, norm_type)
    got = outcome(fastclip.clip_grad_norm_, ours, max_norm, norm_type, error_if_nonfinite, foreach, backend=backend)
    want = outcome(torch.nn.utils.clip_grad_norm_, ref, max_norm, norm_type, error_if_nonfinite, foreach)
    if fused and got[0] == "ok" and want[0] == "raise" and half_norm_overflowed(params, norm_type, got[1]):
        # The documented deviation (README): torch's fp16/bf16 per-tensor norm
        # overflowed to inf, so it raised; ours accumulates in float32 and is
        # finite.  Compare with what torch does when it does not raise.
        ref = clone_params(params)
        want = outcome(torch.nn.utils.clip_grad_norm_, ref, max_norm, norm_type, False, foreach)
    assert_same_outcome(got, want)
    if got[0] == "raise":
        assert_grads_bitwise_equal(ours, params)  # untouched when we raise
        return None, ours
    total, ref_total = got[1], want[1]
    assert type(total) is type(ref_total)
    assert total.dtype == ref_total.dtype and total.device == ref_total.device
    assert total.shape == torch.Size([]) and not total.requires_grad
    if not fused:
        assert_bitwise_equal(total, ref_total)
        assert_grads_bitwise_equal(ours, ref)
        return total, ours
    grads = [p.grad for p in params if p.grad is not None]
    check_total_norm(total, ref_total, grads, norm_type, backend)
    clipped_with = clip_total_for(params, norm_type, max_norm, backend)
    # the total returned is the one the grads were clipped with (in the grads' dtype: fp16/bf16 grads are clipped
    # with the float32 total)
    assert_bitwise_equal(total.cpu(), clipped_with.to(total.dtype))
    expected = clone_params(params)
    torch.nn.utils.clip_grads_with_norm_(expected, max_norm, clipped_with)
    assert_grads_bitwise_equal(ours, expected)
    return total, ours


def count_calls(monkeypatch, obj, *methods) -> dict:
    """Wrap obj.<method> for each method so calls are counted (the count
    dict, by method name, is returned); the wrapped methods still run."""
    counts = dict.fromkeys(methods, 0)
    for method in methods:
        real = getattr(obj, method)

        def counted(*args, _method=method, _real=real, **kwargs):
            counts[_method] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(obj, method, counted)
    return counts


@contextlib.contextmanager
def no_host_sync():
    """The body must not wait for the device: torch's sync debug mode is set
    to "error", which sees torch's own waits only; a wait inside a compiled
    extension shows as the device having caught up, so a second of GPU sleep
    is queued first and must still be running at the end."""
    torch.cuda.synchronize()
    queued = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)
    queued.record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not queued.query(), "the body waited for the device (the work queued before it has finished)"
    torch.cuda.synchronize()


def assert_no_host_sync(calls) -> None:
    """Each call once to warm up (compile, tables), then all of them again
    under no_host_sync(): none may wait for the device."""
    for call in calls:
        call()
    with no_host_sync():
        for call in calls:
            call()


# torch's error for in-place writes to a tensor whose elements share memory
UNWRITABLE = "more than one element of the written-to tensor refers to a single memory location"


def with_unwritable_grad(params):
    """`params` plus one whose grad is an expand() of one value: torch's
    in-place ops refuse to write it, after writing the grads before it."""
    p = torch.nn.Parameter(torch.zeros(5, device=params[0].device))
    p.grad = torch.full((1,), 3.0, device=params[0].device).expand(5)
    return params + [p]


def assert_a_meta_grad_raises_first(clip, params) -> None:
    """clip(params + [a parameter with a meta grad]) raises (its norm cannot be
    copied to the first grad's device) before writing the other grads."""
    meta = torch.nn.Parameter(torch.zeros(4, device="meta"))
    meta.grad = torch.zeros(4, device="meta")
    before = [p.grad.clone() for p in params]
    with pytest.raises(NotImplementedError, match="meta"):
        clip(params + [meta])
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)


def assert_raises_leaving_grads(fn, params, exc, match):
    """fn(params) raises `exc` (matching `match`) and every grad keeps its bits."""
    before = grads_of(params)
    with pytest.raises(exc, match=match):
        fn(params)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)
