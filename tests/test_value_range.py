"""clip_grad_range_ on every backend: grad.clamp_(min_value, max_value), bit for bit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastclip

import decimal
import fractions

from .helpers import (
    FLOAT_DTYPES,
    UNWRITABLE,
    assert_bitwise_equal,
    assert_raises_leaving_grads,
    clone_params,
    grads_of,
    with_unwritable_grad,
)
from .method_refs import random_params, sizes_for

INF, NAN = math.inf, math.nan
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, INF, -INF, NAN, 1e-40, -1e-40, 0.25, -3.0]
BOUNDS = [None, 0.0, -0.0, 0.5, -0.5, 1.0, INF, -INF, 1e-40]


def check_range(params, backend, lo, hi):
    ours, ref = clone_params(params), clone_params(params)
    assert fastclip.clip_grad_range_(ours, lo, hi, backend=backend) is None
    for q in ref:
        if q.grad is not None:
            q.grad.clamp_(lo, hi)
    for a, b in zip(ours, ref):
        if a.grad is not None:
            assert_bitwise_equal(a.grad, b.grad)
    return ours


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_special_values_and_every_bound_pair(backend, dtype):
    # lengths around the vector width reach the SIMD body and the scalar tail
    params = []
    for n in (3, 13, 37, 100):
        p = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
        p.grad = torch.tensor((SPECIAL * 7)[:n], dtype=torch.float64).to(dtype)
        params.append(p)
    for lo, hi in itertools.product(BOUNDS, BOUNDS):
        if lo is None and hi is None:
            continue
        check_range(params, backend, lo, hi)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_random_grads_mixed_sizes(backend, dtype, seed):
    params = random_params([(n,) for n in sizes_for(backend)], [dtype])
    for lo, hi in ((-0.3, 0.7), (-2.0, None), (None, 0.01), (0.5, -0.5), (-0.0, 0.0)):  # lo > hi: torch gives hi
        check_range(params, backend, lo, hi)


def test_mixed_dtypes_none_grads_and_views(backend, seed):
    params = random_params([(5, 7), (30,), (), (4, 4)], FLOAT_DTYPES, with_none=(2,))
    base = torch.randn(12, 10)
    for grad in (base.t(), base[:, ::2], base[3:9, 1:4]):
        p = torch.nn.Parameter(torch.zeros(grad.shape))
        p.grad = grad
        params.append(p)
    check_range(params, backend, -0.2, 0.4)


@pytest.mark.parametrize("lo, hi", [(NAN, 1.0), (-1.0, NAN), (NAN, None), (None, NAN)])
def test_nan_bounds_are_torchs(backend, lo, hi, seed):
    params = random_params([(40,), (3,)], [torch.float32, torch.bfloat16])
    check_range(params, backend, lo, hi)


def test_tensor_bounds_are_torchs(backend, seed):
    params = random_params([(40,), (3,)], [torch.float32])
    check_range(params, backend, torch.tensor(-0.1), torch.tensor(0.2))


def test_no_bound_raises_torchs_error_and_leaves_grads(backend, seed):
    params = random_params([(40,)], [torch.float32])
    before = grads_of(params)
    with pytest.raises(RuntimeError, match="At least one of 'min' or 'max' must not be None"):
        fastclip.clip_grad_range_(params, backend=backend)
    assert_bitwise_equal(params[0].grad, before[0])


@pytest.mark.parametrize(
    "lo, hi", [(None, 1e5), (-7e4, None), (-1.0, 3.4e38), (-1e39, 1.0), (-1.0, 65504.5), (None, 1e39)]
)
def test_bound_overflow_raises_torchs_error_before_any_write(backend, lo, hi, seed):
    for dtypes in ([torch.float16], [torch.bfloat16], [torch.float32], [torch.float64, torch.float32, torch.float16]):
        params = random_params([(20,)] * len(dtypes), dtypes, scale=1e3)
        before = grads_of(params)
        try:
            for g in [g.clone() for g in before]:
                g.clamp_(lo, hi)
            expected = None
        except RuntimeError as exc:
            expected = str(exc)
        if expected is None:
            check_range(params, backend, lo, hi)
            continue
        with pytest.raises(RuntimeError) as info:
            fastclip.clip_grad_range_(params, lo, hi, backend=backend)
        assert str(info.value) == expected
        for p, g in zip(params, before):
            assert_bitwise_equal(p.grad, g)


@pytest.mark.parametrize("lo, hi", [(-2.0, 0.5), (None, -1.0), (0.5, None), (-1.5, 1.5), (2.0, -2.0), (-0.0, 0.0)])
def test_views_with_the_negative_bit(backend, lo, hi, seed):
    """A grad that is a view with torch's negative bit holds -x in memory: a
    clamp that is not odd in x (lo != -hi) must see x (it goes to torch's op)."""
    values = torch.randn(40) * 3
    values[:4] = torch.tensor([0.0, -0.0, math.inf, -math.inf])
    params, want = [], []
    for k in range(3):
        p = torch.nn.Parameter(torch.zeros(40))
        p.grad = torch._neg_view(values.clone()) if k != 1 else values.clone()
        params.append(p)
        want.append(p.grad.resolve_neg().clone().clamp_(lo, hi))
    assert params[0].grad.is_neg()
    fastclip.clip_grad_range_(params, lo, hi, backend=backend)
    for p, w in zip(params, want):
        assert_bitwise_equal(p.grad.resolve_neg(), w)


def test_duplicates_and_overlapping_views(backend, seed):
    p = random_params([(50,)], [torch.float32])[0]
    check_range([p, p], backend, -0.5, 0.5)  # (clone_params keeps the duplicate)
    base = torch.randn(90)
    base[[3, 25, 41]] = torch.tensor([-0.0, NAN, INF])
    want = base.clone()
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (40, 40, 15)]
    for q, view in zip(params, (base[:40], base[20:60], base[60::2])):  # two overlap; one strided, every other left
        q.grad = view
    params.append(params[1])
    fastclip.clip_grad_range_(params, -0.5, 0.25, backend=backend)
    for view in (want[:40], want[20:60], want[60::2]):
        view.clamp_(-0.5, 0.25)
    assert_bitwise_equal(base, want)


def test_version_counter_bumps(backend, seed):
    p = random_params([(50,)], [torch.float32])[0]
    before = p.grad._version
    fastclip.clip_grad_range_([p], -0.1, 0.1, backend=backend)
    assert p.grad._version > before


_READ_ONLY_SCRIPT = """
import mmap, os, sys, tempfile, warnings
import torch, fastclip
backend, lo, hi = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
values = torch.linspace(-0.5, 0.5, 1 << 15)  # all inside [-1, 1]
path = os.path.join(tempfile.mkdtemp(), "grad")
values.numpy().tofile(path)
with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # any write faults
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
    g = torch.frombuffer(buf, dtype=torch.float32)
p = torch.nn.Parameter(torch.zeros(g.shape))
p.grad = g
fastclip.clip_grad_range_([p], lo, hi, backend=backend)
print("ok")
"""


@pytest.mark.parametrize("backend_name", ["cpu", "cuda"])
def test_only_changed_elements_are_written(backend_name):
    """A grad in read-only memory with every value inside the range: nothing
    is written (a write would fault); with a narrower range the same script
    does fault, so the check can fail."""
    import os
    import subprocess
    import sys

    if backend_name not in fastclip.available_backends():
        pytest.skip(f"{backend_name} backend not available")
    env = dict(os.environ)
    if backend_name == "cuda" and not torch.cuda.is_available():
        env["FASTCLIP_CUDA_EMULATE"] = "1"  # the CUDA kernels in their CPU emulation
    elif backend_name == "cuda":
        pytest.skip("GPU tensors are not in host memory")
    run = [sys.executable, "-c", _READ_ONLY_SCRIPT, backend_name]
    inside = subprocess.run(run + ["-1.0", "1.0"], capture_output=True, text=True, env=env, timeout=120)
    assert inside.returncode == 0 and inside.stdout.strip() == "ok", inside.stderr[-2000:]
    narrower = subprocess.run(run + ["-0.25", "0.25"], capture_output=True, text=True, env=env, timeout=120)
    assert narrower.returncode != 0  # a write to read-only memory


@pytest.mark.parametrize(
    "lo, hi",
    [(fractions.Fraction(1, 3), None), (None, 2**64), (-(10**400), None), (decimal.Decimal("0.5"), 1.0)],
    ids=["Fraction", "2**64", "-10**400", "Decimal"],
)
def test_bounds_torch_does_not_take_raise_its_errors(backend, lo, hi, seed):
    params = random_params([(20,), (7,)], [torch.float64, torch.float32])
    with pytest.raises((TypeError, OverflowError)) as want:
        params[0].grad.clone().clamp_(lo, hi)
    before = grads_of(params)
    with pytest.raises(want.type) as got:
        fastclip.clip_grad_range_(params, lo, hi, backend=backend)
    assert str(got.value) == str(want.value)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)


def test_an_unwritable_grad_raises_before_any_write(backend, seed):
    params = with_unwritable_grad(random_params([(30,), (4, 4)], [torch.float32], scale=10.0))
    clip = lambda ps: fastclip.clip_grad_range_(ps, -0.1, 0.1, backend=backend)  # noqa: E731
    assert_raises_leaving_grads(clip, params, RuntimeError, f"{UNWRITABLE}|cannot serve")


def test_bounds_that_are_not_python_floats_are_checked_against_each_grads_dtype(backend, seed):
    """An int or numpy bound beyond float32's range fits a float64 grad (and
    a bf16 grad gets torch's bf16 error, not float32's)."""
    np = pytest.importorskip("numpy")
    params = random_params([(20,)], [torch.float64], scale=1e3)
    check_range(params, backend, 2, 1e300)
    check_range(params, backend, np.float64(-1e300), np.float32(5.0))
    params = random_params([(20,)], [torch.bfloat16], scale=1e3)
    before = grads_of(params)
    with pytest.raises(RuntimeError, match=r"^value cannot be converted to type c10::BFloat16 without overflow$"):
        fastclip.clip_grad_range_(params, 2, 1e39, backend=backend)
    assert_bitwise_equal(params[0].grad, before[0])
