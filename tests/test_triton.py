"""The Triton backend's own parts: the table and work split, 64-bit offsets,
launch counts, the plan cache, the coefficient, and the compiled code.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on
CPU tensors; the compiled-code tests compile for sm_80/sm_90 without a GPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys

import pytest
import torch

import fastclip
from fastclip import _dispatch
from fastclip._work import DTYPE_CODES, _ext, collect
from fastclip.backends import gpu_common, triton_backend
from fastclip.backends.triton_backend import interpreting

from .helpers import FLOAT_DTYPES, make_params, reference_norm

pytestmark = pytest.mark.skipif("triton" not in fastclip.available_backends(), reason="triton backend not available")

TRITON = _dispatch.FUSED_BACKENDS["triton"]
DEVICE = "cpu" if interpreting() else "cuda"
UNIT = TRITON._config().unit


def _columns(table_bytes: bytes, rows: int):
    values = struct.unpack(f"<{4 * rows}q", table_bytes)
    return [list(values[k * rows : (k + 1) * rows]) for k in range(4)]


def test_the_triton_version_ci_asked_for():
    """CI runs the Triton cases with the oldest supported triton too
    (FASTCLIP_EXPECT_TRITON, set by `make test-triton-oldest`): that it is the
    one imported, not the venv's newest."""
    import triton

    expected = os.environ.get("FASTCLIP_EXPECT_TRITON")
    if not expected:
        pytest.skip("FASTCLIP_EXPECT_TRITON not set")
    assert triton.__version__ == expected


# ---------------------------------------------------------------- the table


def test_unit_table_columns_units_and_flags():
    unit = 512
    sizes = [unit, 0, unit + 1, 1, 3 * unit - 1, 0]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float32, torch.float32]
    tensors = [torch.ones(n, dtype=d) for n, d in zip(sizes, dtypes)]
    work = collect(tensors, False)[1]
    table_bytes, rows, units, aligned, mask = work.table.unit_table(unit)
    first, address, numel, code = _columns(table_bytes, rows)
    kept = [i for i, n in enumerate(sizes) if n]  # empty tensors are left out
    assert rows == len(kept)
    assert numel == [sizes[i] for i in kept]
    assert address == [tensors[i].data_ptr() for i in kept]
    assert code == [DTYPE_CODES[dtypes[i]] for i in kept]
    assert first == [0, 1, 3, 4]  # 1 + 2 + 1 + 3 units, never across tensors
    assert units == 7
    assert aligned == all(tensors[i].data_ptr() % 16 == 0 for i in kept)
    assert mask == sum(1 << DTYPE_CODES[d] for d in {dtypes[i] for i in kept})


def test_unit_table_marks_misaligned_grads_and_skips_strided_views():
    base = torch.ones(1000)
    work = collect([base[1:], base[:-1]], False)[1]  # a 4-byte offset
    assert not work.table.unit_table(512)[3]
    strided = torch.ones(40, 40)[:, ::2]
    work = collect([torch.ones(10), strided], False)[1]
    assert work.strided_indices() == [1]
    table_bytes, rows, units, _, _ = work.table.unit_table(512)
    assert rows == 1 and units == 1  # the view is left to the host (a copy for norms, torch ops for writes)
    with pytest.raises(ValueError, match="multiple of 8"):
        work.table.unit_table(12)


@pytest.mark.parametrize("sizes", [[UNIT], [UNIT - 1, UNIT + 1], [1] * 9, [3 * UNIT + 7, 0, 5, 2 * UNIT]])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_work_split_covers_every_element_once(sizes, norm_type, seed):
    if norm_type == math.inf:
        sizes = [n for n in sizes if n]
    dtypes = [FLOAT_DTYPES[i % 4] for i in range(len(sizes))]  # mixed dtypes in one launch
    grads = [torch.randn(n, dtype=torch.float64).to(d).to(DEVICE) for n, d in zip(sizes, dtypes)]
    ours = fastclip.get_total_norm(grads, norm_type, backend="triton")
    theirs = torch.nn.utils.get_total_norm(grads, norm_type)
    exact = reference_norm([g.cpu() for g in grads], norm_type)
    assert ours.dtype == theirs.dtype
    # 16-bit grads sum in float32 within a unit; the total is rounded to its dtype
    rel = max(torch.finfo(ours.dtype).eps, 1e-6 if {torch.float16, torch.bfloat16} & set(dtypes) else 1e-12)
    assert ours.item() == pytest.approx(exact, rel=rel)


def test_results_are_identical_run_to_run(seed):
    grads = [torch.randn(n, device=DEVICE) for n in (5 * UNIT + 3, 17, UNIT)]
    first = fastclip.get_total_norm(grads, backend="triton")
    for _ in range(3):
        assert torch.equal(fastclip.get_total_norm(grads, backend="triton"), first)


def test_all_empty_grads_launch_nothing_and_give_zero(monkeypatch):
    launches = _count_launches(monkeypatch)
    params = make_params([(0,), (0, 3)], device=DEVICE)
    assert all(p.grad is not None for p in params)
    total = fastclip.clip_grad_norm_(params, 1.0, backend="triton")
    assert total.item() == 0.0 and launches == {}


def test_auto_never_picks_the_interpreter_for_cpu_tensors(monkeypatch, seed):
    if not interpreting():
        pytest.skip("only under TRITON_INTERPRET=1")
    launches = _count_launches(monkeypatch)
    fastclip.clip_grad_norm_(make_params([(30,)]), 0.1)
    assert launches == {}


# ---------------------------------------------------------------- launches and the plan cache


def _count_launches(monkeypatch) -> dict:
    counts: dict = {}
    kernels = TRITON._k()
    for name in ("norm_kernel", "scale_kernel", "clamp_kernel"):
        kernel = getattr(kernels, name)

        class Counted:
            def __init__(self, kernel=kernel, name=name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                counts[self.name] = counts.get(self.name, 0) + 1
                return self.kernel[grid]

        monkeypatch.setattr(kernels, name, Counted())
    return counts


def test_launch_counts(monkeypatch, seed):
    params = make_params([(3 * UNIT + 1,), (7,), (UNIT,)], device=DEVICE)
    launches = _count_launches(monkeypatch)
    fastclip.clip_grad_norm_(params, 1e-3, backend="triton")
    assert launches == {"norm_kernel": 1, "scale_kernel": 1}  # norm + coefficient, then scale
    launches.clear()
    fastclip.clip_grad_norm_(params, 1e9, backend="triton")  # not clipping: the scale launch returns at once
    assert launches == {"norm_kernel": 1, "scale_kernel": 1}
    launches.clear()
    fastclip.get_total_norm([p.grad for p in params], backend="triton")
    assert launches == {"norm_kernel": 1}
    launches.clear()
    fastclip.clip_grad_value_(params, 0.5, backend="triton")
    assert launches == {"clamp_kernel": 1}
    launches.clear()
    fastclip.clip_grads_with_norm_(params, 1.0, torch.tensor(5.0, device=DEVICE), backend="triton")
    assert launches == {"scale_kernel": 1}


def test_plan_is_reused_while_addresses_and_sizes_stay(seed):
    grads = [torch.randn(n, device=DEVICE) for n in (100, 2 * UNIT)]
    fastclip.get_total_norm(grads, backend="triton")
    plans = dict(TRITON._plans)
    fastclip.get_total_norm(grads, backend="triton")
    assert dict(TRITON._plans) == plans  # same table: nothing rebuilt or copied
    fastclip.get_total_norm([grads[1], grads[0]], backend="triton")
    assert len(TRITON._plans) == len(plans) + 1 or len(TRITON._plans) == triton_backend._PLAN_CACHE_SIZE


def test_plan_cache_is_bounded(seed):
    for _ in range(triton_backend._PLAN_CACHE_SIZE + 5):
        fastclip.get_total_norm([torch.randn(3, device=DEVICE)], backend="triton")
    assert len(TRITON._plans) <= triton_backend._PLAN_CACHE_SIZE


# ---------------------------------------------------------------- 64-bit offsets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_offsets_beyond_2_to_the_31_elements(dtype, seed):
    """Units far beyond element 2^31 (byte offsets beyond 2^32) of a tensor:
    a one-row table whose first unit is -k makes unit 0 the tensor's unit k,
    and a base address k units before a real buffer makes that unit the
    buffer.  Only the buffer is read or written, so no 4 GB tensor is needed."""
    kernels = TRITON._k()
    config = TRITON._config()
    k = (1 << 31) // config.unit + 3
    tail = torch.randn(config.unit - 5, device=DEVICE).to(dtype)  # a short last unit (masked path)
    start = k * config.unit
    assert start > 2**31 and start * tail.element_size() > 2**32
    numel = start + tail.numel()
    base = tail.data_ptr() - start * tail.element_size()
    table = torch.tensor([-k, base, numel, DTYPE_CODES[dtype]], dtype=torch.int64, device=DEVICE)
    shape = dict(table=table, n_rows=1, n_units=1, SEARCH_STEPS=0, BLOCK=config.block, ITERS=config.iters,
                 ALIGNED=False, HAS_F32=dtype == torch.float32, HAS_F64=False, HAS_F16=False,
                 HAS_BF16=dtype == torch.bfloat16)  # fmt: skip
    partials = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    total = torch.empty((), dtype=torch.float32, device=DEVICE)
    results = torch.empty(2, dtype=torch.float64, device=DEVICE)
    kernels.norm_kernel[(1,)](**shape, partials=partials, counter=counter, total_out=total, results=results,
                              max_norm_bits=triton_backend._bits(1.0), KIND=2, RESULT_F64=False, FINISH_BLOCK=1)  # fmt: skip
    exact = torch.linalg.vector_norm(tail.double()).item()
    assert results[1].item() == pytest.approx(exact, rel=1e-6 if dtype == torch.bfloat16 else 1e-12)
    expected = tail.float().mul(0.5).to(dtype)
    coef = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    kernels.scale_kernel[(1,)](**shape, coef_ptr=coef)
    assert torch.equal(tail, expected)
    bounds = {k + "_bits": triton_backend._bits32(v) for k, v in gpu_common.clamp_bounds(-0.1, 0.1).items()}
    kernels.clamp_kernel[(1,)](**shape, **bounds,
                               lo64_bits=triton_backend._bits(-0.1), hi64_bits=triton_backend._bits(0.1))  # fmt: skip
    assert torch.equal(tail, expected.clamp_min(-0.1).clamp_max(0.1))


# ---------------------------------------------------------------- the coefficient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_coefficient_is_torchs(dtype, seed):
    # The L1 norm of one element is exactly |t|: the kernel's coefficient for
    # that total must equal torch's clamp(max_norm / (t + 1e-6), max=1).
    rng = random.Random(seed)
    cases = [(t, m) for t in (0.0, 1e-6, 1.0, 3e38, math.inf, math.nan) for m in (1.0, 0.0, -1.0, math.inf, math.nan)]
    cases += [(10 ** rng.uniform(-8, 8), 10 ** rng.uniform(-8, 8)) for _ in range(40)]
    for t, m in cases:
        g = torch.tensor([t], dtype=dtype, device=DEVICE)
        work = collect([g], False)[1]
        _total, coef = TRITON.clip_details(work, 1, m)
        want = torch.clamp(m / (torch.tensor(t, dtype=dtype) + 1e-6), max=1.0).item()
        assert coef == want or (math.isnan(coef) and math.isnan(want)), (t, m, coef, want)


# ---------------------------------------------------------------- compiled code (no GPU needed)


@pytest.mark.parametrize("arch", [80, 90])
def test_compiled_kernels_use_16_byte_loads_and_stores(arch):
    """Compile every kernel for sm_80/sm_90 (no GPU needed; in a fresh process,
    since this one loaded the kernels for the interpreter) and check that full
    units use 16-byte vector loads and stores."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.compile_kernels", str(arch)],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout)
    for name, c in counts.items():
        assert "finish" in name or c["v4_loads"] > 0 or "unaligned" in name, (name, c)
        assert c["fma"] == 0, (name, c)  # launched without fp fusion: the interpreter's rounding
    assert counts["scale_kernel"]["v4_stores"] > 0
    assert len(counts) == (13 if arch == 90 else 2)
