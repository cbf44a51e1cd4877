"""The segmented core shared by the methods: codes defined once, the tables
and their checks, the coefficient formulas (C++ and their Triton twins), the
counting kernels on every instruction set, determinism, and indexing beyond
2^31 elements in every backend's segmented kernels."""

from __future__ import annotations

import math
import random
import struct

import pytest
import torch

import fastclip
from fastclip import _ext as ext
from fastclip._work import DTYPE_CODES, collect
from fastclip.backends.base import SegmentCall

from .helpers import assert_bitwise_equal, interpreted
from .test_cpu_kernels import _mem_available_gib

pytestmark = pytest.mark.skipif(ext.cpu is None, reason="fastclip._cpu is not built")
cpu = ext.cpu


def table_of(tensors, first=None, lens=None, segments=None, weights=None):
    work = collect(tensors, False)[1]
    wptrs = [w.data_ptr() for w in weights] if weights is not None else None
    wcodes = [DTYPE_CODES[w.dtype] for w in weights] if weights is not None else None
    return work.table.with_segments(first, lens, len(tensors) if segments is None else segments, wptrs, wcodes)


# ---------------------------------------------------------------- codes, defined once


def test_the_codes_come_from_the_extension_and_match_the_fallback():
    assert ext.NORM_KINDS == dict(cpu.NORM_KINDS) == ext._WITHOUT_EXTENSION["NORM_KINDS"]
    assert ext.COEFFICIENT_MODES == dict(cpu.COEFFICIENT_MODES) == ext._WITHOUT_EXTENSION["COEFFICIENT_MODES"]
    assert dict(cpu.DTYPE_CODES) == ext._WITHOUT_EXTENSION["DTYPE_CODES"]
    assert {str(d).replace("torch.", ""): c for d, c in DTYPE_CODES.items()} == dict(cpu.DTYPE_CODES)


# ---------------------------------------------------------------- tables


def test_table_checks_segments():
    a, b = torch.ones(6), torch.ones(4)
    with pytest.raises(ValueError, match="must not decrease"):
        table_of([a, b], [1, 0], None, 2)
    with pytest.raises(ValueError, match="stay below num_segments"):
        table_of([a, b], [0, 2], None, 2)
    with pytest.raises(ValueError, match="must divide"):
        table_of([a, b], [0, 3], [4, 0], 5)
    with pytest.raises(ValueError, match="one first segment"):
        collect([a, b], False)[1].table.with_segments([0], [0], 2)
    with pytest.raises(ValueError, match="must be dense"):
        table_of([torch.ones(6, 6)[:, ::2], b], [0, 3], [3, 0], 4)
    with pytest.raises(ValueError, match="one weight per tensor"):
        collect([a, b], False)[1].table.with_segments(None, None, 2, [a.data_ptr()], [0])
    table_of([a, b], [0, 0], None, 1)  # a group: two tensors, one segment
    table_of([a, torch.ones(0), b], [0, 2, 2], [2, 0, 0], 4)  # slices, then an empty tensor


def test_segment_table_layout():
    grads = [torch.ones(10), torch.ones(0), torch.ones(3, 8, dtype=torch.float64), torch.ones(5, dtype=torch.bfloat16)]
    weights = [torch.ones(10), torch.ones(0), torch.ones(3, 8, dtype=torch.float16), torch.ones(5, dtype=torch.bfloat16)]
    table = table_of(grads, [0, 1, 1, 4], [0, 0, 8, 0], 5, weights)
    unit = 8
    data, rows, units, segments, filled, aligned, mask, wmask = table.segment_table(unit)
    values = struct.unpack(f"<{len(data) // 8}q", data)
    assert rows == 3 and segments == 5
    cols = [values[c * rows : (c + 1) * rows] for c in range(8)]
    assert cols[0] == (0, 2, 5)  # 10 elements: 2 units; 3 slices of 8: 3 units; 5: 1 unit
    assert cols[1] == tuple(g.data_ptr() for g in grads if g.numel())
    assert cols[2] == (10, 24, 5)
    assert cols[3] == (0, 1, 3) and cols[7] == (0, 2, 3)
    assert cols[4] == (10, 8, 5) and cols[5] == (0, 1, 4)
    first_units = values[8 * rows : 8 * rows + segments + 1]
    assert first_units == (0, 2, 3, 4, 5, 6)  # segment s's units: [first_units[s], first_units[s + 1])
    assert values[8 * rows + segments + 1 :] == (0, 1, 1, 1, 0)  # float64 segments: the fp64 grad's slices
    assert units == 6 and filled == 5
    assert mask == 0b1011 and wmask == 0b1101
    table = table_of([torch.ones(0), torch.ones(4)], [0, 1], None, 2)
    data, rows, units, segments, filled = table.segment_table(8)[:5]
    values = struct.unpack(f"<{len(data) // 8}q", data)
    assert values[8 * rows : 8 * rows + 3] == (0, 0, 1) and filled == 1  # segment 0 has no units


def test_agc_table_is_the_table_agc_builds_in_python(seed):
    """agc_table (AGC's one-call description of weights and units) gives the
    table of the general path: the same segment table, byte for byte; None
    for what only the general path takes, never a guess."""
    from fastclip.methods import agc

    shapes = [(4, 3), (5,), (), (1, 7), (3, 0), (0, 4), (6, 2, 3), (2, 5)]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(shape).to(dtypes[i % 4]))
        if i == len(shapes) - 1:  # a weight of another dtype than its grad
            if hasattr(p, "grad_dtype"):
                p.grad_dtype = None
            p.grad = torch.randn(shape, dtype=torch.bfloat16)
        else:
            p.grad = torch.randn(shape).to(p.dtype)
        params.append(p)
    grads, table, _mask, _device = cpu.collect(params, True, DTYPE_CODES, torch.Tensor, torch.nn.Parameter)
    got, count = cpu.agc_table(table, params, grads, torch.Tensor, torch.nn.Parameter)
    first, lens, want_count = agc._segments(grads)
    want = table_of(grads, first, lens, want_count, [p.detach() for p in params])
    assert count == want_count == got.num_segments and got.has_weights
    assert got.segment_table(8) == want.segment_table(8)
    plain = [p.detach() for p in params]  # plain tensors as weights: the same table
    assert cpu.agc_table(table, plain, grads, torch.Tensor, torch.nn.Parameter)[0].segment_table(8) == want.segment_table(8)

    def refused(weights, grad_list=grads):
        return cpu.agc_table(table, weights, grad_list, torch.Tensor, torch.nn.Parameter) is None

    assert refused([agc._Pair(p, p.grad) for p in params])  # stand-ins: not tensors
    assert refused(params[:-1]) and refused(params, grads[:-1])  # lengths
    view = torch.nn.Parameter(torch.randn(3, 4).t())  # a transposed weight
    assert refused([view] + params[1:])
    other = torch.nn.Parameter(torch.randn(12))  # another shape, the same size
    assert refused([other] + params[1:])
    meta = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    assert refused([meta] + params[1:])

    class Sub(torch.nn.Parameter):
        pass

    assert refused([Sub(params[0].detach())] + params[1:])  # subclasses: the general path


# ---------------------------------------------------------------- the formulas and their Triton twins


def _coefficient_cases(seed):
    rng = random.Random(seed)
    specials = [0.0, 1e-7, 1e-6, 1.0, 3e38, math.inf, math.nan, 0.5, 2.0]
    cases = [(a, b, c) for a in specials for b in specials for c in (1.0, 0.0, -1.0, math.inf, 0.01)]
    cases += [(10 ** rng.uniform(-8, 8), 10 ** rng.uniform(-8, 8), 10 ** rng.uniform(-4, 1)) for _ in range(300)]
    return cases


def test_cpu_coefficients_match_torchs_expressions(seed):
    for power, wpower, factor in _coefficient_cases(seed):
        for wide, dtype in ((False, torch.float32), (True, torch.float64)):
            got = cpu.segment_coefficient(1, 1, wide, power, 0.0, factor, 0.0, 0.0)  # L1: the norm is the power
            total = torch.tensor(power, dtype=torch.float64).to(dtype)
            want = torch.clamp(factor / (total + 1e-6), max=1.0).item()
            assert got == want or (math.isnan(got) and math.isnan(want)), (power, factor, got, want)
            got = cpu.segment_coefficient(2, 1, wide, power, wpower, 0.0, factor, 1e-3)
            g = torch.tensor([power], dtype=torch.float64).to(dtype)
            w = torch.tensor([wpower], dtype=torch.float64).to(dtype)
            max_norm = w.clamp(min=1e-3).mul(factor)  # timm's operations on tensors of the segment's dtype
            coef = torch.where(g < max_norm, torch.ones_like(g), max_norm / g.clamp(min=1e-6)).item()
            assert got == coef or (math.isnan(got) and math.isnan(coef)), (power, wpower, factor, got, coef)


try:  # (TRITON_INTERPRET is set by conftest before this import, where there is no GPU)
    import triton
    import triton.language as tl

    from fastclip.backends import triton_kernels as K
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _twins(inputs, outputs, n, MODE: tl.constexpr, KIND: tl.constexpr):
        """The Triton formulas on rows of (power, weight power, max_norm or clip_factor, wide)."""
        i = 0
        while i < n:
            power = tl.load(inputs + 4 * i)
            wpower = tl.load(inputs + 4 * i + 1)
            factor = tl.load(inputs + 4 * i + 2)
            wide = tl.load(inputs + 4 * i + 3) != 0.0
            norm = K._norm_from_power(power, KIND)
            if MODE == 1:
                tl.store(outputs + i, K._clip_coefficient(norm, wide, factor))
            else:
                wnorm = K._norm_from_power(wpower, KIND)
                tl.store(outputs + i, K._agc_coefficient(norm, wnorm, wide, factor, tl.full((), 1e-3, tl.float64)))
            i += 1


@pytest.mark.skipif("triton" not in fastclip.available_backends(), reason="triton backend not available")
def test_triton_twins_give_the_cpu_formulas_bits(seed):
    device = "cpu" if interpreted("triton") else "cuda"
    cases = [(p, w, f, wide) for p, w, f in _coefficient_cases(seed) for wide in (0.0, 1.0)]
    inputs = torch.tensor(cases, dtype=torch.float64, device=device).reshape(-1)
    for mode in (1, 2):
        for kind in (1, 2):
            out = torch.empty(len(cases), dtype=torch.float64, device=device)
            _twins[(1,)](inputs, out, len(cases), MODE=mode, KIND=kind)
            for (p, w, f, wide), got in zip(cases, out.tolist()):
                want = cpu.segment_coefficient(mode, kind, bool(wide), p, w, f if mode == 1 else 0.0,
                                               f if mode == 2 else 0.0, 1e-3)  # fmt: skip
                assert got == want or (math.isnan(got) and math.isnan(want)), (mode, kind, p, w, f, wide, got, want)


# ---------------------------------------------------------------- the CPU kernels: counts, ISAs, threads


@pytest.mark.parametrize("isa", cpu.available_isas() if cpu is not None else [])
def test_counts_and_norms_on_every_instruction_set(isa, seed):
    values = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -2.0, 1e-40, 0.5, 3.0, 0.0]
    old = cpu.isa()
    cpu.select_isa(isa)
    try:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for n in (3, 17, 64, 1000, 40_001):
                g = torch.tensor([random.choice(values) for _ in range(n)], dtype=torch.float64).to(dtype)
                h = torch.randn(n, dtype=torch.float64).to(dtype)
                for kind in (1, 2, 3):
                    powers = torch.zeros(2, dtype=torch.float64)
                    counts = torch.zeros(2, dtype=torch.int64)
                    cpu.segments(table_of([g, h]), kind, 1, 1, powers=powers.data_ptr(), counts=counts.data_ptr())
                    assert counts.tolist() == [int((~torch.isfinite(g)).sum()) + int((~torch.isfinite(h)).sum()),
                                               int((g == 0).sum()) + int((h == 0).sum())]  # fmt: skip
                    plain = torch.zeros(2, dtype=torch.float64)
                    cpu.segments(table_of([g, h]), kind, 1, 1, powers=plain.data_ptr())
                    assert_bitwise_equal(powers, plain)  # counting changes no bit of the sums
                    finite = torch.zeros(2, dtype=torch.float64)  # and the sums are right: h alone
                    cpu.segments(table_of([h]), kind, 1, 1, powers=finite.data_ptr(), counts=counts.data_ptr())
                    x = h.double().abs()
                    want = {1: x.sum(), 2: x.square().sum(), 3: x.max()}[kind].item()
                    rel = 1e-12 if dtype in (torch.float32, torch.float64) else 1e-6  # (fp16/bf16: float32 blocks)
                    assert finite[0].item() == pytest.approx(want, rel=rel, abs=0), (kind, dtype, n)
    finally:
        cpu.select_isa(old)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_results_do_not_depend_on_the_thread_count(seed):
    grads = [torch.randn(n) for n in (800_000, 70_001, 3, 1 << 17)]
    assert _bytes(grads) >= cpu.parallel_min_bytes  # (below it the kernels run on one thread whatever is asked)
    weights = [torch.randn(g.shape) for g in grads]
    table = table_of(grads, [0, 40, 60, 61], [20_000, 0, 0, 1 << 12], 93, weights)
    results = []
    for threads in (1, 2, 3):
        p, w = torch.zeros(93, dtype=torch.float64), torch.zeros(93, dtype=torch.float64)
        cpu.segments(table, 2, 1, threads, powers=p.data_ptr(), weight_powers=w.data_ptr())
        results.append((p, w))
    for p, w in results[1:]:
        assert_bitwise_equal(p, results[0][0])
        assert_bitwise_equal(w, results[0][1])
    want = torch.stack([t.square().sum() for t in grads[0].view(40, 20_000).double()])
    torch.testing.assert_close(results[0][0][:40], want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("isa", cpu.available_isas() if cpu is not None else [])
def test_agc_rows_read_with_their_weights_give_the_bits_of_rows_read_alone(isa, seed):
    """AGC's rows: a grad row and its weight row of one dtype are read in one
    loop, two streams in flight.  Each row's sum (or maximum) is the bits
    the kernel gives for that row alone, across the length from which other
    runs are walked as four streams (16 KB; rows never are), for a row left
    alone in the last work unit of its tensor (8 rows of 4100: units of 7
    and 1), and for rows longer than half a work unit (read unit by unit,
    not packed).  A whole tensor read beside its weight (AGC's unit of a 1-D
    parameter) is likewise the same grad bits whatever the weight's dtype."""
    old = cpu.isa()
    cpu.select_isa(isa)
    try:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            shapes = ((40, 3), (9, 17), (30, 300), (3, 2047), (2, 2049), (3, 4100), (8, 4100), (2, 9000), (2, 20_000))
            for rows, length in shapes:
                g = (torch.randn(rows, length, dtype=torch.float64) * 0.01).to(dtype)
                w = torch.randn(rows, length, dtype=torch.float64).to(dtype)
                for kind in (1, 2, 3):
                    p, pw = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
                    cpu.segments(table_of([g], [0], [length], rows, [w]), kind, 1, 1,
                                 powers=p.data_ptr(), weight_powers=pw.data_ptr())  # fmt: skip
                    # weights of another dtype: each row read alone, the same bits for the grads
                    other = w.to(torch.float32 if dtype == torch.float64 else torch.float64)
                    p2, pw2 = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
                    cpu.segments(table_of([g], [0], [length], rows, [other]), kind, 1, 1,
                                 powers=p2.data_ptr(), weight_powers=pw2.data_ptr())  # fmt: skip
                    for t, got in ((g, p), (w, pw), (g, p2)):
                        alone = torch.zeros(rows, dtype=torch.float64)
                        cpu.segments(table_of([t], [0], [length], rows), kind, 1, 1, powers=alone.data_ptr())
                        assert_bitwise_equal(got, alone)
                        x = t.double().abs()
                        want = {1: x.sum(1), 2: x.square().sum(1), 3: x.amax(1)}[kind]
                        rel = 1e-12 if dtype in (torch.float32, torch.float64) else 1e-5
                        torch.testing.assert_close(got, want, rtol=rel, atol=0)
            whole = (torch.randn(40_000, dtype=torch.float64) * 0.01).to(dtype)  # units of 32768 and 7232
            for kind in (1, 2, 3):
                got = []
                for w in (torch.randn(40_000, dtype=torch.float64), torch.randn(40_000).to(dtype)):
                    p, pw = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
                    cpu.segments(table_of([whole], [0], [0], 1, [w]), kind, 1, 1,
                                 powers=p.data_ptr(), weight_powers=pw.data_ptr())  # fmt: skip
                    got.append(p)
                assert_bitwise_equal(got[0], got[1])
    finally:
        cpu.select_isa(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_agc_in_one_call_equals_its_three_steps(dtype, seed):
    """The CPU clips AGC's rows as it reads them where a work unit holds them
    whole (reduce, finish and apply in one call): the same bits as the three
    steps one after another, every row clipped once, for every thread count."""
    from fastclip.backends.base import COEFFICIENT_MODES
    from fastclip.methods.agc import _segments as agc_segments

    # packed short rows, rows longer than half a work unit, a 1-D tensor cut
    # into several units, a single row, a scalar
    shapes = [(70, 300), (2, 40_000), (1_000_000,), (1, 700), (), (9, 5000)]
    # grad rows of random size against the weights', so that about half clip
    row_scale = [torch.rand(s[0], *[1] * (len(s) - 1), dtype=torch.float64) * 2 if len(s) >= 2 else 1.0
                 for s in shapes]  # fmt: skip
    grads = [(torch.randn(s, dtype=torch.float64) * 0.012 * r).to(dtype) for s, r in zip(shapes, row_scale)]
    grads[0][3, 7] = float("nan")  # a NaN row: its coefficient is NaN, as timm's torch.where gives
    weights = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    assert _bytes(grads) >= cpu.parallel_min_bytes  # (below it the kernels run on one thread whatever is asked)
    first, lens, count = agc_segments(grads)  # AGC's own segment layout
    mode, kind = COEFFICIENT_MODES["agc"], 2

    def run(one_call: bool, threads: int):
        ours = [g.clone() for g in grads]
        table = table_of(ours, first, lens, count, weights)
        p, w, c = (torch.zeros(count, dtype=torch.float64) for _ in range(3))
        args = dict(powers=p.data_ptr(), weight_powers=w.data_ptr(), coefs=c.data_ptr(), mode=mode,
                    clip_factor=0.012, eps=1e-3)
        if one_call:
            cpu.segments(table, kind, 7, threads, **args)
        else:
            for step in (1, 2, 4):
                cpu.segments(table, kind, step, threads, **args)
        return ours, c

    want, coefs = run(False, 1)
    clipped = int(((coefs != 1) & ~coefs.isnan()).sum())
    assert 0 < clipped < count  # some rows clip, some do not
    for threads in (1, 2, 3):
        got, got_coefs = run(True, threads)
        assert_bitwise_equal(got_coefs, coefs)
        for a, b in zip(got, want):
            assert_bitwise_equal(a, b)


# ---------------------------------------------------------------- beyond 2^31 elements (GPU kernels)


def _fake_far_row(backend_unit: int, dtype, sliced: bool):
    """A one-row segment table whose only unit lies far beyond element 2^31 of
    its tensor: the first-unit column is -k (unit 0 is the row's unit k) and
    the base address is k units' worth before a real buffer, so only that
    buffer is read or written.  Sliced: slices of 3 units + 5 elements, the
    unit the last of a slice (a short one)."""
    es = torch.tensor([], dtype=dtype).element_size()
    if sliced:
        slice_len = 3 * backend_unit + 5
        piece = (1 << 31) // slice_len + 7
        k = piece * 4 + 3  # 4 units per slice: the slice's last, short unit
        start = piece * slice_len + 3 * backend_unit
        count = 5
    else:
        k = (1 << 31) // backend_unit + 3
        start = k * backend_unit
        count = backend_unit - 5
        slice_len = start + count
        piece = 0
    assert start > 2**31 and start * es > 2**32
    tail = torch.randn(count).to(dtype)
    weight = torch.randn(count).to(dtype)
    numel = slice_len * (piece + 1) if sliced else slice_len
    row = [-k, tail.data_ptr() - start * es, numel, DTYPE_CODES[dtype], slice_len, 0 - piece,
           weight.data_ptr() - start * es, DTYPE_CODES[dtype]]  # fmt: skip
    table = torch.tensor(row + [0, 1, 0], dtype=torch.int64)  # segment 0: units [0, 1); not wide
    return table, tail, weight


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_segment_kernels_beyond_2_to_the_31(dtype, sliced, seed):
    if "triton" not in fastclip.available_backends() or not interpreted("triton"):
        pytest.skip("the fake table points into host memory: Triton's interpreter only")
    from fastclip._dispatch import FUSED_BACKENDS

    triton_backend = FUSED_BACKENDS["triton"]
    kernels, config = triton_backend._k(), triton_backend._config()
    table, tail, weight = _fake_far_row(config.unit, dtype, sliced)
    flags = {f"HAS_{n}": d == dtype for n, d in (("F32", torch.float32), ("F64", torch.float64),
                                                   ("F16", torch.float16), ("BF16", torch.bfloat16))}  # fmt: skip
    wflags = {"W_" + k[4:]: v for k, v in flags.items()}
    f64 = torch.float64
    powers, wpowers, coefs = torch.zeros(1, dtype=f64), torch.zeros(1, dtype=f64), torch.zeros(1, dtype=f64)
    kernels.segment_reduce_kernel[(1,)](
        table, 1, 1, 1, 1, torch.zeros(1, dtype=f64), torch.zeros(1, dtype=f64), torch.zeros(1, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32), powers, wpowers, torch.zeros(2, dtype=torch.int64),
        torch.ones(1, dtype=f64), 1, 0, 0, torch.zeros(1, dtype=f64), coefs, torch.zeros((), dtype=f64),
        MODE=0, KIND=2, WEIGHTS=True, COUNTS=True, FINISH=False, NORMS=False, TOTAL=False, SEARCH_STEPS=0,
        BLOCK=config.block, ITERS=config.iters, FINISH_BLOCK=16, ALIGNED=False, **flags, **wflags,
    )  # fmt: skip
    assert powers.item() == pytest.approx(tail.double().square().sum().item(), rel=1e-6)
    assert wpowers.item() == pytest.approx(weight.double().square().sum().item(), rel=1e-6)
    expected = tail.float().mul(0.5).to(dtype)
    kernels.segment_apply_kernel[(1,)](table, 1, 1, torch.tensor([0.5], dtype=f64), SEARCH_STEPS=0,
                                       BLOCK=config.block, ITERS=config.iters, ALIGNED=False, **flags)  # fmt: skip
    assert_bitwise_equal(tail, expected)


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_segment_kernels_beyond_2_to_the_31(dtype, sliced, seed):
    if ext.cuda_emu is None:
        pytest.skip("fastclip._cuda_emu is not built")
    m = ext.cuda_emu
    table, tail, weight = _fake_far_row(m.unit_elems, dtype, sliced)
    f64 = torch.float64
    powers, wpowers = torch.zeros(1, dtype=f64), torch.zeros(1, dtype=f64)
    scratch = [torch.zeros(1, dtype=f64), torch.zeros(1, dtype=f64), torch.zeros(1, dtype=torch.int32),
               torch.zeros(1, dtype=torch.int32)]  # fmt: skip
    counts = torch.zeros(2, dtype=torch.int64)
    m.segments(0, 0, "reduce", table.data_ptr(), 1, 1, 1, 1, *[t.data_ptr() for t in scratch],
               powers=powers.data_ptr(), weight_powers=wpowers.data_ptr(), counts=counts.data_ptr(), kind=2)  # fmt: skip
    assert powers.item() == pytest.approx(tail.double().square().sum().item(), rel=1e-6)
    assert wpowers.item() == pytest.approx(weight.double().square().sum().item(), rel=1e-6)
    assert counts.tolist() == [0, int((tail == 0).sum())]
    expected = tail.float().mul(0.5).to(dtype)
    coefs = torch.tensor([0.5], dtype=f64)
    m.segments(0, 0, "apply", table.data_ptr(), 1, 1, 1, 1, coefs=coefs.data_ptr())
    assert_bitwise_equal(tail, expected)


@pytest.mark.bigmem
@pytest.mark.skipif(_mem_available_gib() < 14, reason="needs about 10 GiB of free memory")
def test_cpu_segments_beyond_2_to_the_31_elements():
    """AGC, per-tensor clipping and statistics over a bf16 grad of 3 x 715827909
    elements (its last unit starts past element 2^31), with its weight."""
    rows, inner = 3, 715_827_909
    g = torch.zeros(rows, inner, dtype=torch.bfloat16)  # zero pages until written
    w = torch.zeros(rows, inner, dtype=torch.bfloat16)
    g[2, -1], g[2, -7], g[0, 5] = 3.0, -4.0, 0.5
    w[2, -2], w[0, 0] = 100.0, 1.0
    assert 2 * inner + inner - 7 > 2**31
    p = torch.nn.Parameter(w, requires_grad=False)
    p.grad = g
    stats = fastclip.grad_stats([p])
    assert stats.per_tensor_norms.item() == pytest.approx((9 + 16 + 0.25) ** 0.5)
    assert stats.num_zeros.item() == rows * inner - 3
    fastclip.adaptive_clip_grad_([p], 0.01)  # unit 2: max_norm 1, ‖G‖ 5: scaled by 1/5
    assert (g[2, -1].item(), g[2, -7].item()) == (pytest.approx(0.6, rel=1e-2), pytest.approx(-0.8, rel=1e-2))
    assert g[0, 5].item() == pytest.approx(0.01, rel=1e-2)  # unit 0: max_norm 0.01 < ‖G‖ 0.5: clipped
    del g, w, p
