"""Triton kernels of the triton backend (host side: triton_backend.py).

Two tables, both built in C++ from the gathered TensorTable:

* torch's operations (the total norm, the scale, the clamp) read the unit
  table (csrc/common/unit_table.h): four int64 columns of n rows, one row per
  non-empty dense grad, [first unit | address | element count | dtype code];
* the segmented methods read the segment table (csrc/common/segment_table.h):
  eight columns [first unit | address | numel | dtype code | slice length |
  first segment | weight address | weight code], then each segment's first
  unit, then each segment's float64 flag.

All grads, viewed as one virtual concatenation, are cut into work units of at
most UNIT = BLOCK * ITERS elements that never cross a tensor (nor, in the
segment table, a segment).  A persistent grid of G programs takes units pid,
pid + G, pid + 2G, ...; each program finds a unit's row by a binary search
over the first-unit column (SEARCH_STEPS = ceil(log2(rows))).

Loop bounds are constexpr or come from program ids and scalar arguments,
never from memory, and loops over them are `while` loops (triton 3.6's
interpreter cannot take its program ids as `range` bounds), so the same code
runs compiled and under TRITON_INTERPRET=1.  Full units take an unmasked
path: with 16-byte aligned grads (ALIGNED) the compiler emits 16-byte vector
loads and stores; only a short unit uses masks.  Every kernel dispatches on
the dtype in one place, _on_unit.

clip_grad_norm_ is two launches: norm_kernel (per-program partials; the last
program to finish combines them in a fixed order and writes the total and the
clip coefficient), then scale_kernel, which reads the coefficient and does
nothing when it is exactly 1.  A segmented method is two launches too:
segment_reduce_kernel (a partial per unit; the last unit of a segment to
finish folds its segment's partials in unit order and computes the segment's
coefficient), then segment_apply_kernel (each unit times its segment's
coefficient, unless that is exactly 1).  No host sync anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ext import COEFFICIENT_MODES, DTYPE_CODES, NORM_KINDS

# The codes of csrc/common (dtypes, norm kinds, coefficient modes), from the extension.
# `if HAS_X:` around `if code == X:` is deliberate: the constexpr test drops
# the dtypes a call does not have at compile time.
F32 = tl.constexpr(DTYPE_CODES[torch.float32])
F64 = tl.constexpr(DTYPE_CODES[torch.float64])
F16 = tl.constexpr(DTYPE_CODES[torch.float16])
BF16 = tl.constexpr(DTYPE_CODES[torch.bfloat16])
L1 = tl.constexpr(NORM_KINDS[1.0])
L2 = tl.constexpr(NORM_KINDS[2.0])
LINF = tl.constexpr(NORM_KINDS[float("inf")])
CLIP_NORM = tl.constexpr(COEFFICIENT_MODES["clip_norm"])
AGC = tl.constexpr(COEFFICIENT_MODES["agc"])
# What _on_unit does to a unit.
NORM = tl.constexpr(0)  # a partial norm (float64)
STATS = tl.constexpr(1)  # a partial norm, and the counts of non-finite elements and of zeros
SCALE = tl.constexpr(2)  # x *= coef
CLAMP = tl.constexpr(3)  # x = clamp(x, lo, hi), storing only what changes
SEGMENT_COLUMNS = tl.constexpr(8)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _float32_of(bits):
    """The float32 whose bits are the int32 `bits` (float arguments travel as
    bits: some Triton versions drop the sign of a zero float argument)."""
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _float64_of(bits):
    """The float64 whose bits are the int64 `bits`."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _widen(x, ACC: tl.constexpr):
    """x in ACC (float32 or float64).  bfloat16 is widened with a shift: exact
    for every bit pattern, compiled or interpreted."""
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(ACC)


@triton.jit
def _narrow(y, DTYPE: tl.constexpr):
    """float32 (or float64 for fp64 grads) y stored as DTYPE, rounded to
    nearest even.  bfloat16 is rounded with integer ops, as c10 does (the
    interpreter's own bf16 rounding is not round-to-nearest-even)."""
    if DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN: a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(DTYPE)


@triton.jit
def _store_rounded(ptr, v):
    """The float64 v stored as ptr's dtype, rounded as c10 rounds a double
    (fp16/bf16 through float32)."""
    if ptr.dtype.element_ty == tl.float64:
        tl.store(ptr, v)
    else:
        tl.store(ptr, _narrow(v.to(tl.float32), ptr.dtype.element_ty))


@triton.jit
def _nonfinite(x):
    """inf or NaN, by the exponent bits (x float32 or float64).  (One return:
    code after a return inside a constexpr if is still type-checked when
    compiled, and a float64 x cannot be bitcast to uint32; the interpreter
    never runs it.)"""
    if x.dtype == tl.float64:
        r = (x.to(tl.uint64, bitcast=True) & 0x7FF0000000000000) == 0x7FF0000000000000
    else:
        r = (x.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000
    return r


@triton.jit
def _locate(table, n_rows, u, SEARCH_STEPS: tl.constexpr, UNIT: tl.constexpr):
    """Unit table: (address, dtype code, first element, element count) of work unit u."""
    lo = u * 0  # row whose first unit is <= u ...
    hi = lo + n_rows  # ... and the first row whose first unit is > u
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(table + mid) <= u
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    first_unit = tl.load(table + lo)
    address = tl.load(table + n_rows + lo)
    numel = tl.load(table + 2 * n_rows + lo)
    code = tl.load(table + 3 * n_rows + lo)
    start = (u - first_unit).to(tl.int64) * UNIT
    count = tl.minimum(numel - start, UNIT)
    return address, code, start, count


@triton.jit
def _locate_segment(table, n_rows, u, SEARCH_STEPS: tl.constexpr, UNIT: tl.constexpr):
    """Segment table: (address, dtype code, first element, element count,
    segment, weight address, weight code) of work unit u (csrc/common/segments.h unit_span)."""
    lo = u * 0
    hi = lo + n_rows
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(table + mid) <= u
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    first_unit = tl.load(table + lo)
    address = tl.load(table + n_rows + lo)
    code = tl.load(table + 3 * n_rows + lo)
    slice_len = tl.load(table + 4 * n_rows + lo)
    first_segment = tl.load(table + 5 * n_rows + lo)
    weight = tl.load(table + 6 * n_rows + lo)
    weight_code = tl.load(table + 7 * n_rows + lo)
    k = (u - first_unit).to(tl.int64)
    per = (slice_len + UNIT - 1) // UNIT  # units per slice
    piece = k // per
    j = k - piece * per
    start = piece * slice_len + j * UNIT
    count = tl.minimum(slice_len - j * UNIT, UNIT)
    return address, code, start, count, first_segment + piece, weight, weight_code


@triton.jit
def _typed(address, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to element `start` of a tensor of DTYPE at `address`."""
    ptr = address.to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:  # the host checked: every unit starts 16-byte aligned
        ptr = tl.multiple_of(ptr, 16)
    return ptr


# ---------------------------------------------------------------- one unit


@triton.jit
def _unit_norm(
    ptr, count, KIND: tl.constexpr, ACC: tl.constexpr, COUNT: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    """Partial norm of `count` elements at ptr (float64): sum of |x|, of x*x,
    or max |x|; with COUNT also the numbers of non-finite elements and zeros."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), ACC)
    nonfinite = tl.zeros((BLOCK,), tl.int32)
    zeros = tl.zeros((BLOCK,), tl.int32)
    for i in tl.static_range(ITERS):
        o = i * BLOCK + offs
        if FULL:
            x = _widen(tl.load(ptr + o), ACC)
        else:
            x = _widen(tl.load(ptr + o, mask=o < count, other=0.0), ACC)
        if COUNT:
            nonfinite += _nonfinite(x).to(tl.int32)
            if FULL:
                zeros += (x == 0.0).to(tl.int32)
            else:
                zeros += ((x == 0.0) & (o < count)).to(tl.int32)
        if KIND == L1:
            acc += tl.abs(x)
        elif KIND == L2:
            acc += x * x
        else:
            acc = _max_nan(acc, tl.abs(x))
    if KIND == LINF:
        part = tl.reduce(acc, 0, _max_nan).to(tl.float64)
    else:
        part = tl.sum(acc, 0).to(tl.float64)
    return part, tl.sum(nonfinite, 0).to(tl.int64), tl.sum(zeros, 0).to(tl.int64)


@triton.jit
def _unit_scale(ptr, count, coef, BLOCK: tl.constexpr, ITERS: tl.constexpr, FULL: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for i in tl.static_range(ITERS):
        o = i * BLOCK + offs
        if FULL:
            x = tl.load(ptr + o)
            tl.store(ptr + o, _narrow(_widen(x, coef.dtype) * coef, x.dtype))
        else:
            m = o < count
            x = tl.load(ptr + o, mask=m)
            tl.store(ptr + o, _narrow(_widen(x, coef.dtype) * coef, x.dtype), mask=m)


@triton.jit
def _unit_clamp(ptr, count, lo, hi, CMP: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, FULL: tl.constexpr):
    """torch's clamp_(lo, hi) (clamp_min_ then clamp_max_), compared in CMP,
    storing only the elements that change (NaN elements never do)."""
    offs = tl.arange(0, BLOCK)
    for i in tl.static_range(ITERS):
        o = i * BLOCK + offs
        if FULL:
            x = tl.load(ptr + o)
        else:
            x = tl.load(ptr + o, mask=o < count, other=0.0)
        xf = _widen(x, CMP)
        y = tl.where(xf < lo, lo, xf)
        y = tl.where(y > hi, hi, y)
        changed = (xf < lo) | (xf > hi)
        if not FULL:
            changed = changed & (o < count)
        tl.store(ptr + o, _narrow(y, x.dtype), mask=changed)


@triton.jit
def _typed_op(
    OP: tl.constexpr, address, start, count, DTYPE: tl.constexpr, KIND: tl.constexpr, coef, lo, hi,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """OP on one unit of DTYPE.  Norms accumulate fp16/bf16 in float32 within
    the unit, fp32 and fp64 in float64; scale and clamp compute in float32
    (float64 for fp64), like torch's opmath."""
    ptr = _typed(address, start, DTYPE, ALIGNED)
    part = tl.zeros((), tl.float64)
    nonfinite = tl.zeros((), tl.int64)
    zeros = tl.zeros((), tl.int64)
    if OP == NORM or OP == STATS:
        ACC: tl.constexpr = tl.float32 if (DTYPE == tl.float16 or DTYPE == tl.bfloat16) else tl.float64
        if count == BLOCK * ITERS:
            part, nonfinite, zeros = _unit_norm(ptr, count, KIND, ACC, OP == STATS, BLOCK, ITERS, True)
        else:
            part, nonfinite, zeros = _unit_norm(ptr, count, KIND, ACC, OP == STATS, BLOCK, ITERS, False)
    elif OP == SCALE:
        MATH: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
        c = coef.to(MATH)
        if count == BLOCK * ITERS:
            _unit_scale(ptr, count, c, BLOCK, ITERS, True)
        else:
            _unit_scale(ptr, count, c, BLOCK, ITERS, False)
    else:
        CMP: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
        if count == BLOCK * ITERS:
            _unit_clamp(ptr, count, lo, hi, CMP, BLOCK, ITERS, True)
        else:
            _unit_clamp(ptr, count, lo, hi, CMP, BLOCK, ITERS, False)
    return part, nonfinite, zeros


@triton.jit
def _on_unit(
    OP: tl.constexpr, address, code, start, count, KIND: tl.constexpr, coef,
    lo32, hi32, lo64, hi64, lo16, hi16, lo_bf16, hi_bf16,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_F32: tl.constexpr, HAS_F64: tl.constexpr, HAS_F16: tl.constexpr, HAS_BF16: tl.constexpr,
):  # fmt: skip
    """OP on the unit [start, start + count) of the tensor at `address` of dtype
    `code`: the one dtype dispatch of every kernel.  Returns (partial norm,
    non-finite elements, zeros): zeros except for NORM and STATS.  Clamp
    bounds come rounded to each dtype, as torch converts them."""
    part = tl.zeros((), tl.float64)
    nonfinite = tl.zeros((), tl.int64)
    zeros = tl.zeros((), tl.int64)
    if HAS_F32:
        if code == F32:
            part, nonfinite, zeros = _typed_op(OP, address, start, count, tl.float32, KIND, coef, lo32, hi32,
                                               BLOCK, ITERS, ALIGNED)  # fmt: skip
    if HAS_F64:
        if code == F64:
            part, nonfinite, zeros = _typed_op(OP, address, start, count, tl.float64, KIND, coef, lo64, hi64,
                                               BLOCK, ITERS, ALIGNED)  # fmt: skip
    if HAS_F16:
        if code == F16:
            part, nonfinite, zeros = _typed_op(OP, address, start, count, tl.float16, KIND, coef, lo16, hi16,
                                               BLOCK, ITERS, ALIGNED)  # fmt: skip
    if HAS_BF16:
        if code == BF16:
            part, nonfinite, zeros = _typed_op(OP, address, start, count, tl.bfloat16, KIND, coef, lo_bf16, hi_bf16,
                                               BLOCK, ITERS, ALIGNED)  # fmt: skip
    return part, nonfinite, zeros


@triton.jit
def _fold(a, b, KIND: tl.constexpr):
    if KIND == LINF:
        return _max_nan(a, b)
    return a + b


# ---------------------------------------------------------------- the per-segment formulas
# Twins of csrc/common/coefficients.h (tests/test_segments.py checks them
# against it through fastclip._cpu.segment_coefficient).


@triton.jit
def _norm_from_power(power, KIND: tl.constexpr):
    if KIND == L2:
        return tl.sqrt(power)  # float64: correctly rounded
    return power


@triton.jit
def _segment_norm(norm, wide):
    """The norm as the segment works: float64, or rounded to float32."""
    return tl.where(wide, norm, norm.to(tl.float32).to(tl.float64))


@triton.jit
def _clip_coefficient(total, wide, max_norm):
    """torch's clamp(max_norm / (total + 1e-6), max=1): reciprocal, then
    multiply, in float32 unless wide (div_rn: IEEE float32 division)."""
    c64 = (1.0 / (total + 1e-6)) * max_norm
    r32 = tl.math.div_rn(tl.full((), 1.0, tl.float32), total.to(tl.float32) + 1e-6)
    c32 = (r32 * max_norm.to(tl.float32)).to(tl.float64)
    c = tl.where(wide, c64, c32)
    return tl.where(c > 1.0, 1.0, c)  # NaN stays NaN, as with torch.clamp


@triton.jit
def _agc_coefficient(grad_norm, weight_norm, wide, clip_factor, eps):
    """AGC: max_norm = max(‖W‖, eps) * clip_factor; 1 when ‖G‖ < max_norm,
    else max_norm / max(‖G‖, 1e-6); timm's operations, float32 unless wide."""
    m64 = tl.where(weight_norm < eps, eps, weight_norm) * clip_factor
    c64 = m64 / tl.where(grad_norm < 1e-6, 1e-6, grad_norm)
    c64 = tl.where(grad_norm < m64, 1.0, c64)
    g = grad_norm.to(tl.float32)
    w = weight_norm.to(tl.float32)
    e = eps.to(tl.float32)
    m32 = tl.where(w < e, e, w) * clip_factor.to(tl.float32)
    floor = tl.full((), 1e-6, tl.float32)
    c32 = tl.math.div_rn(m32, tl.where(g < floor, floor, g))
    c32 = tl.where(g < m32, 1.0, c32.to(tl.float64))
    return tl.where(wide, c64, c32)


@triton.jit
def _finish_segment(
    s, power, weight_power, table, n_rows, n_segments, max_norms, max_norms_len, clip_factor, eps, norms, coefs,
    MODE: tl.constexpr, KIND: tl.constexpr, NORMS: tl.constexpr,
):  # fmt: skip
    """Segment s's coefficient (and norm) from its folded powers."""
    wide = tl.load(table + SEGMENT_COLUMNS * n_rows + n_segments + 1 + s) != 0
    norm = _norm_from_power(power, KIND)
    if MODE == CLIP_NORM:
        max_norm = tl.load(max_norms + tl.where(max_norms_len == 1, 0, s))
        tl.store(coefs + s, _clip_coefficient(norm, wide, max_norm))
    elif MODE == AGC:
        weight_norm = _norm_from_power(weight_power, KIND)
        tl.store(coefs + s, _agc_coefficient(norm, weight_norm, wide, clip_factor, eps))
    if NORMS:
        _store_rounded(norms + s, _segment_norm(norm, wide))


@triton.jit
def _fold_range(values, first, count, KIND: tl.constexpr, FINISH_BLOCK: tl.constexpr):
    """values[first : first + count] folded in a fixed order (tree within
    blocks of FINISH_BLOCK, blocks in order), read around L1 (.cg): other
    programs wrote them."""
    idx = tl.arange(0, FINISH_BLOCK)
    acc = tl.zeros((), tl.float64)
    done = count * 0
    while done < count:
        m = idx < count - done
        v = tl.load(values + first + done + idx, mask=m, other=0.0, cache_modifier=".cg")
        if KIND == LINF:
            acc = _max_nan(acc, tl.reduce(v, 0, _max_nan))
        else:
            acc += tl.sum(v, 0)
        done += FINISH_BLOCK
    return acc


# ---------------------------------------------------------------- torch's operations (the unit table)


# Float64 bit patterns come as int64 arguments; do_not_specialize keeps
# Triton from turning a pattern that happens to equal 1 into a constant.
@triton.jit(do_not_specialize=["max_norm_bits"])
def norm_kernel(
    table,
    n_rows,
    n_units,
    partials,
    counter,
    total_out,
    results,
    max_norm_bits,
    KIND: tl.constexpr,
    RESULT_F64: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_F32: tl.constexpr,
    HAS_F64: tl.constexpr,
    HAS_F16: tl.constexpr,
    HAS_BF16: tl.constexpr,
):
    """The total norm into total_out[0] (in its dtype); the clip coefficient and
    the unrounded total into results[0] and results[1] (float64).

    fp16/bf16 accumulate in float32 within a unit, fp32 and fp64 in float64;
    units and programs combine in float64.  max_norm_bits: the float64 max_norm's bits.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc = tl.zeros((), tl.float64)
    u = pid
    while u < n_units:
        address, code, start, count = _locate(table, n_rows, u, SEARCH_STEPS, BLOCK * ITERS)
        part, _nf, _z = _on_unit(NORM, address, code, start, count, KIND, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                 BLOCK, ITERS, ALIGNED, HAS_F32, HAS_F64, HAS_F16, HAS_BF16)  # fmt: skip
        acc = _fold(acc, part, KIND)
        u += n_programs
    tl.store(partials + pid, acc)

    # "Last program done": the program that finishes last combines every
    # program's partial in program order (deterministic for a given grid).
    tl.debug_barrier()  # the whole program's stores happen before the release below
    done_before = tl.atomic_add(counter, 1, sem="acq_rel")
    if done_before == n_programs - 1:
        idx = tl.arange(0, FINISH_BLOCK)
        parts = tl.load(partials + idx, mask=idx < n_programs, other=0.0, cache_modifier=".cg")
        if KIND == LINF:
            total = tl.reduce(parts, 0, _max_nan)
        else:
            total = _norm_from_power(tl.sum(parts, 0), KIND)
        max_norm = _float64_of(max_norm_bits)
        # torch's coefficient, in the norm's dtype (float32 for fp16/bf16:
        # fastclip clips with the float32 total; see README).
        _store_rounded(total_out, total)
        tl.store(results, _clip_coefficient(total, RESULT_F64, max_norm))
        tl.store(results + 1, total)
        tl.store(counter, 0)  # ready for the next call (and for CUDA-graph replay)


@triton.jit
def scale_kernel(
    table,
    n_rows,
    n_units,
    coef_ptr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_F32: tl.constexpr,
    HAS_F64: tl.constexpr,
    HAS_F16: tl.constexpr,
    HAS_BF16: tl.constexpr,
):
    """grad *= coef_ptr[0] (in float32 for fp32/fp16/bf16 grads, float64 for
    fp64, like torch's _foreach_mul_), or nothing if it is exactly 1.

    Units are taken in reverse of norm_kernel's order, so the units read last
    by the norm (still in L2) are scaled first."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    coef = _widen(tl.load(coef_ptr), tl.float64)
    if coef != 1.0:  # x * 1 == x bit for bit: skipping moves one read of the grads instead of three
        u = pid + (n_units - 1 - pid) // n_programs * n_programs  # this program's last unit
        while u >= 0:
            address, code, start, count = _locate(table, n_rows, u, SEARCH_STEPS, BLOCK * ITERS)
            _on_unit(SCALE, address, code, start, count, L2, coef, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                     BLOCK, ITERS, ALIGNED, HAS_F32, HAS_F64, HAS_F16, HAS_BF16)  # fmt: skip
            u -= n_programs


@triton.jit(do_not_specialize=["lo32_bits", "hi32_bits", "lo64_bits", "hi64_bits"])
def clamp_kernel(
    table,
    n_rows,
    n_units,
    lo32_bits,
    hi32_bits,
    lo16_bits,
    hi16_bits,
    lo_bf16_bits,
    hi_bf16_bits,
    lo64_bits,
    hi64_bits,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_F32: tl.constexpr,
    HAS_F64: tl.constexpr,
    HAS_F16: tl.constexpr,
    HAS_BF16: tl.constexpr,
):
    """clamp_(lo, hi) in one pass (clip_grad_value_ and clip_grad_range_).
    Bounds come already rounded to each dtype, as torch converts them, as the
    bits of their float32 values (fp32/fp16/bf16 grads) or float64 values
    (fp64 grads): bits keep the sign of a zero bound, which some Triton
    versions drop from float arguments and float constants."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    lo32 = _float32_of(lo32_bits)
    hi32 = _float32_of(hi32_bits)
    lo16 = _float32_of(lo16_bits)
    hi16 = _float32_of(hi16_bits)
    lo_bf16 = _float32_of(lo_bf16_bits)
    hi_bf16 = _float32_of(hi_bf16_bits)
    lo64 = _float64_of(lo64_bits)
    hi64 = _float64_of(hi64_bits)
    u = pid
    while u < n_units:
        address, code, start, count = _locate(table, n_rows, u, SEARCH_STEPS, BLOCK * ITERS)
        _on_unit(CLAMP, address, code, start, count, L2, 1.0, lo32, hi32, lo64, hi64, lo16, hi16, lo_bf16, hi_bf16,
                 BLOCK, ITERS, ALIGNED, HAS_F32, HAS_F64, HAS_F16, HAS_BF16)  # fmt: skip
        u += n_programs


# ---------------------------------------------------------------- the segmented primitives (the segment table)


@triton.jit(do_not_specialize=["n_units", "n_segments", "filled", "max_norms_len", "clip_factor_bits", "eps_bits"])
def segment_reduce_kernel(
    table,
    n_rows,
    n_units,
    n_segments,
    filled,
    unit_parts,
    unit_weight_parts,
    segment_counter,
    done_counter,
    powers,
    weight_powers,
    counts,
    max_norms,
    max_norms_len,
    clip_factor_bits,
    eps_bits,
    norms,
    coefs,
    total,
    MODE: tl.constexpr,
    KIND: tl.constexpr,
    WEIGHTS: tl.constexpr,
    COUNTS: tl.constexpr,
    FINISH: tl.constexpr,
    NORMS: tl.constexpr,
    TOTAL: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_F32: tl.constexpr,
    HAS_F64: tl.constexpr,
    HAS_F16: tl.constexpr,
    HAS_BF16: tl.constexpr,
    W_F32: tl.constexpr,
    W_F64: tl.constexpr,
    W_F16: tl.constexpr,
    W_BF16: tl.constexpr,
):
    """Per segment: powers[s] (and weight_powers[s]), each segment's unit
    partials folded in unit order by the last of its units to finish; counts
    (non-finite elements, zeros) added up with integer atomics.  With FINISH
    that unit also computes the segment's coefficient (coefs[s]) and norm
    (norms[s], with NORMS); with TOTAL the last segment finished folds every
    segment's power into the total norm (in total's dtype).
    segment_counter[0:S] and done_counter[0] start at 0 and are left at 0."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    clip_factor = _float64_of(clip_factor_bits)
    eps = _float64_of(eps_bits)
    first_units = table + SEGMENT_COLUMNS * n_rows
    u = pid
    while u < n_units:
        address, code, start, count, s, weight, weight_code = _locate_segment(table, n_rows, u, SEARCH_STEPS,
                                                                              BLOCK * ITERS)  # fmt: skip
        if COUNTS:
            part, nonfinite, zeros = _on_unit(STATS, address, code, start, count, KIND, 0.0,
                                              0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                              BLOCK, ITERS, ALIGNED, HAS_F32, HAS_F64, HAS_F16, HAS_BF16)  # fmt: skip
            tl.atomic_add(counts, nonfinite)  # integers: any order gives the same sum
            tl.atomic_add(counts + 1, zeros)
        else:
            part, _nf, _z = _on_unit(NORM, address, code, start, count, KIND, 0.0,
                                     0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                     BLOCK, ITERS, ALIGNED, HAS_F32, HAS_F64, HAS_F16, HAS_BF16)  # fmt: skip
        tl.store(unit_parts + u, part)
        if WEIGHTS:
            wpart, _nf, _z = _on_unit(NORM, weight, weight_code, start, count, KIND, 0.0,
                                      0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                      BLOCK, ITERS, ALIGNED, W_F32, W_F64, W_F16, W_BF16)  # fmt: skip
            tl.store(unit_weight_parts + u, wpart)
        # The last unit of segment s to finish folds the segment.
        tl.debug_barrier()  # this unit's stores happen before the release below
        first = tl.load(first_units + s)
        units = tl.load(first_units + s + 1) - first
        if tl.atomic_add(segment_counter + s, 1, sem="acq_rel") == units - 1:
            power = _fold_range(unit_parts, first, units, KIND, FINISH_BLOCK)
            tl.store(powers + s, power)
            weight_power = tl.zeros((), tl.float64)
            if WEIGHTS:
                weight_power = _fold_range(unit_weight_parts, first, units, KIND, FINISH_BLOCK)
                tl.store(weight_powers + s, weight_power)
            if FINISH:
                _finish_segment(s, power, weight_power, table, n_rows, n_segments, max_norms, max_norms_len,
                                clip_factor, eps, norms, coefs, MODE, KIND, NORMS)  # fmt: skip
            tl.store(segment_counter + s, 0)
            if TOTAL:  # the last segment folded folds them all, in segment order
                tl.debug_barrier()
                if tl.atomic_add(done_counter, 1, sem="acq_rel") == filled - 1:
                    whole = _fold_range(powers, 0, n_segments, KIND, FINISH_BLOCK)
                    _store_rounded(total, _norm_from_power(whole, KIND))
                    tl.store(done_counter, 0)
        u += n_programs


@triton.jit(do_not_specialize=["n_segments", "max_norms_len", "clip_factor_bits", "eps_bits"])
def segment_finish_kernel(
    table,
    n_rows,
    n_segments,
    powers,
    weight_powers,
    max_norms,
    max_norms_len,
    clip_factor_bits,
    eps_bits,
    norms,
    coefs,
    total,
    MODE: tl.constexpr,
    KIND: tl.constexpr,
    WEIGHTS: tl.constexpr,
    NORMS: tl.constexpr,
    TOTAL: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
):
    """Coefficients (and norms, total) from powers already folded (and
    reduced over ranks): segments pid, pid + G, ...; program 0 the total."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    clip_factor = _float64_of(clip_factor_bits)
    eps = _float64_of(eps_bits)
    s = pid
    while s < n_segments:
        weight_power = tl.zeros((), tl.float64)
        if WEIGHTS:
            weight_power = tl.load(weight_powers + s)
        _finish_segment(s, tl.load(powers + s), weight_power, table, n_rows, n_segments, max_norms, max_norms_len,
                        clip_factor, eps, norms, coefs, MODE, KIND, NORMS)  # fmt: skip
        s += n_programs
    if TOTAL:
        if pid == 0:
            whole = _fold_range(powers, 0, n_segments, KIND, FINISH_BLOCK)
            _store_rounded(total, _norm_from_power(whole, KIND))


@triton.jit
def segment_apply_kernel(
    table,
    n_rows,
    n_units,
    coefs,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_F32: tl.constexpr,
    HAS_F64: tl.constexpr,
    HAS_F16: tl.constexpr,
    HAS_BF16: tl.constexpr,
):
    """Each unit times its segment's coefficient, unless that is exactly 1
    (in float32 for fp32/fp16/bf16 grads, float64 for fp64); units last first."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    u = pid + (n_units - 1 - pid) // n_programs * n_programs
    while u >= 0:
        address, code, start, count, s, _w, _wc = _locate_segment(table, n_rows, u, SEARCH_STEPS, BLOCK * ITERS)
        coef = tl.load(coefs + s)
        if coef != 1.0:
            _on_unit(SCALE, address, code, start, count, L2, coef, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                     BLOCK, ITERS, ALIGNED, HAS_F32, HAS_F64, HAS_F16, HAS_BF16)  # fmt: skip
        u -= n_programs
