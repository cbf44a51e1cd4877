"""Triton kernels of the triton backend (host side: triton_backend.py).

Every kernel reads one tensor table (see unit_table in csrc/common/unit_table.h):
four int64 columns of n rows, one row per non-empty dense grad,

    [first unit | address | element count | dtype code]

All grads, viewed as one virtual concatenation, are cut into work units of
UNIT = BLOCK * ITERS elements; a tensor's units never cross into the next
tensor (its last unit may be short).  A persistent grid of G programs takes
units pid, pid + G, pid + 2G, ...; each program finds a unit's tensor by a
binary search over the first-unit column (SEARCH_STEPS = ceil(log2(n))).

Loop bounds are constexpr or derived from program ids and scalar arguments,
never loaded from memory, so the same code runs compiled and under
TRITON_INTERPRET=1.  Full units take an unmasked path: with 16-byte aligned
grads (ALIGNED) the compiler emits 16-byte vector loads and stores; only a
tensor's last, short unit uses masks.

clip_grad_norm_ is two launches: norm_kernel (per-program partials, the last
program to finish combines them in a fixed order and writes the total and
the clip coefficient to device memory), then scale_kernel, which reads the
coefficient and does nothing when it is exactly 1.  No host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

# dtype codes (csrc/common/dtypes.h) and norm kinds (backends/base.py).
# `if HAS_X:` around `if code == X:` is deliberate: the constexpr test drops
# the dtypes a call does not have at compile time.
F32 = tl.constexpr(0)
F64 = tl.constexpr(1)
F16 = tl.constexpr(2)
BF16 = tl.constexpr(3)
L1 = tl.constexpr(1)
L2 = tl.constexpr(2)
LINF = tl.constexpr(3)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _float32_of(bits):
    """The float32 whose bits are the int32 `bits`."""
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
def _locate(table, n_rows, u, SEARCH_STEPS: tl.constexpr, UNIT: tl.constexpr):
    """(address, dtype code, first element, element count) of work unit u."""
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
def _typed(address, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to element `start` of a tensor of DTYPE at `address`."""
    ptr = address.to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:  # the host checked: every grad is 16-byte aligned (units are multiples of 16 bytes)
        ptr = tl.multiple_of(ptr, 16)
    return ptr


# ---------------------------------------------------------------- norm


@triton.jit
def _unit_norm(
    ptr, count, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, FULL: tl.constexpr
):
    """Partial norm of `count` elements at ptr (float64): sum of |x|, of x*x, or max |x|."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), ACC)
    for i in tl.static_range(ITERS):
        o = i * BLOCK + offs
        if FULL:
            x = _widen(tl.load(ptr + o), ACC)
        else:
            x = _widen(tl.load(ptr + o, mask=o < count, other=0.0), ACC)
        if KIND == L1:
            acc += tl.abs(x)
        elif KIND == L2:
            acc += x * x
        else:
            acc = _max_nan(acc, tl.abs(x))
    if KIND == LINF:
        return tl.reduce(acc, 0, _max_nan).to(tl.float64)
    return tl.sum(acc, 0).to(tl.float64)


@triton.jit
def _dtype_norm(
    address,
    start,
    count,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    ptr = _typed(address, start, DTYPE, ALIGNED)
    if count == BLOCK * ITERS:
        part = _unit_norm(ptr, count, KIND, ACC, BLOCK, ITERS, True)
    else:
        part = _unit_norm(ptr, count, KIND, ACC, BLOCK, ITERS, False)
    return part


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
        part = tl.zeros((), tl.float64)
        if HAS_F32:
            if code == F32:
                part = _dtype_norm(address, start, count, tl.float32, tl.float64, KIND, BLOCK, ITERS, ALIGNED)
        if HAS_F64:
            if code == F64:
                part = _dtype_norm(address, start, count, tl.float64, tl.float64, KIND, BLOCK, ITERS, ALIGNED)
        if HAS_F16:
            if code == F16:
                part = _dtype_norm(address, start, count, tl.float16, tl.float32, KIND, BLOCK, ITERS, ALIGNED)
        if HAS_BF16:
            if code == BF16:
                part = _dtype_norm(address, start, count, tl.bfloat16, tl.float32, KIND, BLOCK, ITERS, ALIGNED)
        if KIND == LINF:
            acc = _max_nan(acc, part)
        else:
            acc += part
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
            total = tl.sum(parts, 0)
            if KIND == L2:
                total = tl.sqrt(total)  # float64: always correctly rounded
        max_norm = _float64_of(max_norm_bits)
        # torch's coefficient: clamp(max_norm / (total + 1e-6), max=1) as
        # reciprocal then multiply, in the norm's dtype (float32 for fp16/bf16:
        # fastclip clips with the float32 total; see README).
        if RESULT_F64:
            tl.store(total_out, total)
            coef = (1.0 / (total + 1e-6)) * max_norm  # float64 division is IEEE
        else:
            total32 = total.to(tl.float32)
            tl.store(total_out, _narrow(total32, total_out.dtype.element_ty))
            # div_rn: IEEE division (plain float32 "/" may be approximate)
            coef32 = tl.math.div_rn(tl.full((), 1.0, tl.float32), total32 + 1e-6) * max_norm.to(tl.float32)
            coef = coef32.to(tl.float64)
        coef = tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN, as with torch.clamp
        tl.store(results, coef)
        tl.store(results + 1, total)
        tl.store(counter, 0)  # ready for the next call (and for CUDA-graph replay)


# ---------------------------------------------------------------- scale


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
def _dtype_scale(
    address, start, count, coef, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr
):
    ptr = _typed(address, start, DTYPE, ALIGNED)
    if count == BLOCK * ITERS:
        _unit_scale(ptr, count, coef, BLOCK, ITERS, True)
    else:
        _unit_scale(ptr, count, coef, BLOCK, ITERS, False)


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
            if HAS_F32:
                if code == F32:
                    _dtype_scale(address, start, count, coef.to(tl.float32), tl.float32, BLOCK, ITERS, ALIGNED)
            if HAS_F64:
                if code == F64:
                    _dtype_scale(address, start, count, coef, tl.float64, BLOCK, ITERS, ALIGNED)
            if HAS_F16:
                if code == F16:
                    _dtype_scale(address, start, count, coef.to(tl.float32), tl.float16, BLOCK, ITERS, ALIGNED)
            if HAS_BF16:
                if code == BF16:
                    _dtype_scale(address, start, count, coef.to(tl.float32), tl.bfloat16, BLOCK, ITERS, ALIGNED)
            u -= n_programs


# ---------------------------------------------------------------- clamp


@triton.jit
def _unit_clamp(ptr, count, lo, hi, CMP: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, FULL: tl.constexpr):
    """torch's clamp_min_(lo) then clamp_max_(hi), compared in CMP, storing
    only the elements that change (NaN elements never do)."""
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
def _dtype_clamp(
    address,
    start,
    count,
    lo,
    hi,
    DTYPE: tl.constexpr,
    CMP: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    ptr = _typed(address, start, DTYPE, ALIGNED)
    if count == BLOCK * ITERS:
        _unit_clamp(ptr, count, lo, hi, CMP, BLOCK, ITERS, True)
    else:
        _unit_clamp(ptr, count, lo, hi, CMP, BLOCK, ITERS, False)


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
    """clip_grad_value_ in one pass.  Bounds come already rounded to each
    dtype, as torch converts them, as the bits of their float32 values
    (fp32/fp16/bf16 grads) or float64 values (fp64 grads): bits keep the sign
    of a zero bound, which some Triton versions drop from float arguments and
    float constants."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    lo32 = _float32_of(lo32_bits)
    hi32 = _float32_of(hi32_bits)
    lo16 = _float32_of(lo16_bits)
    hi16 = _float32_of(hi16_bits)
    lo_bf16 = _float32_of(lo_bf16_bits)
    hi_bf16 = _float32_of(hi_bf16_bits)
    u = pid
    while u < n_units:
        address, code, start, count = _locate(table, n_rows, u, SEARCH_STEPS, BLOCK * ITERS)
        if HAS_F32:
            if code == F32:
                _dtype_clamp(address, start, count, lo32, hi32, tl.float32, tl.float32, BLOCK, ITERS, ALIGNED)
        if HAS_F64:
            if code == F64:
                lo64 = _float64_of(lo64_bits)
                hi64 = _float64_of(hi64_bits)
                _dtype_clamp(address, start, count, lo64, hi64, tl.float64, tl.float64, BLOCK, ITERS, ALIGNED)
        if HAS_F16:
            if code == F16:
                _dtype_clamp(address, start, count, lo16, hi16, tl.float16, tl.float32, BLOCK, ITERS, ALIGNED)
        if HAS_BF16:
            if code == BF16:
                _dtype_clamp(address, start, count, lo_bf16, hi_bf16, tl.bfloat16, tl.float32, BLOCK, ITERS, ALIGNED)
        u += n_programs
