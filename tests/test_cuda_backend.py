"""The CUDA C++ backend where there may be no GPU: fastclip._cuda is built
and linked wherever nvcc is (CI has nvcc and no GPU), imports, says why it
cannot run, and the kernels' host-side code is right: the launch table's
packing and chunking, the search every block runs to find its unit, and the
clip coefficient (the same C++ functions the device runs, compiled for the
host).  tests/test_gpu.py runs the kernels themselves against torch."""

from __future__ import annotations

import math
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import fastclip
from fastclip import _cpu

try:
    from fastclip import _cuda
except ImportError:
    _cuda = None

HAVE_NVCC = bool(
    shutil.which("nvcc")
    or os.path.exists("/usr/local/cuda/bin/nvcc")
    or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"))
)
needs_module = pytest.mark.skipif(_cuda is None, reason="fastclip._cuda is not built (no nvcc at build time)")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_module_is_built_where_nvcc_is():
    if not HAVE_NVCC:
        pytest.skip("no nvcc on this machine")
    assert _cuda is not None, "nvcc is here, so setup.py must have built fastclip._cuda"
    assert _cuda.archs.split(";") == os.environ.get("FASTCLIP_CUDA_ARCHS", "80;90").split(";")


@needs_module
def test_module_links_the_cuda_runtime_statically():
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    deps = subprocess.run(["ldd", _cuda.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in deps and "libtorch" not in deps and "libc10" not in deps


@needs_module
@no_gpu
def test_built_but_not_available_without_a_gpu():
    status = fastclip.backend_info()["cuda"]
    assert status["built"] and not status["available"]
    assert "CUDA" in status["reason"] and status["version"].startswith("CUDA runtime 13.")
    assert "cuda" not in fastclip.available_backends()
    out = subprocess.run([sys.executable, "-m", "fastclip", "info"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("cuda "))
    assert line.split()[1:3] == ["True", "False"]


@needs_module
@no_gpu
def test_cuda_failures_raise_runtime_errors_naming_the_call():
    with pytest.raises(RuntimeError, match=r"^fastclip\._cuda: cudaSetDevice failed: cudaError\w+ \("):
        _cuda.device_setup(0)
    table, rows, units = unit_table([100, 20000], [0, 3])
    with pytest.raises(RuntimeError, match="cudaSetDevice failed"):
        _cuda.clip_norm(0, 0, table, rows, units, 2, 1.0, 0, 8, 8, 8, 1 << 20, 8, True, True)
    with pytest.raises(RuntimeError, match="cudaSetDevice failed"):
        _cuda.clamp(0, 0, table, rows, units, -1, 1, -1, 1, -1, 1, -1.0, 1.0)


# ---------------------------------------------------------------- the launch table


def unit_table(numels, codes, ptrs=None):
    """The unit table of tensors at made-up addresses (nothing is read)."""
    ptrs = ptrs or [(i + 1) << 40 for i in range(len(numels))]
    table, rows, units, _aligned, _mask = _cpu.TensorTable(ptrs, numels, codes).unit_table(_cuda.unit_elems)
    return table, rows, units


def expected_units(numels, codes):
    """(row, first element, count, code) of every unit, worked out independently."""
    unit = _cuda.unit_elems
    out = []
    row = 0
    for n, code in zip(numels, codes):
        if n == 0:
            continue  # empty grads get no row
        for start in range(0, n, unit):
            out.append((row, start, min(unit, n - start), code))
        row += 1
    return out


def random_sizes(rng, count):
    u = _cuda.unit_elems
    pool = [0, 1, 7, u - 1, u, u + 1, 2 * u, 3 * u + 5]
    return [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(1, 5 * u) for _ in range(count)]


@needs_module
def test_locate_finds_every_unit(seed):
    rng = random.Random(seed)
    numels = random_sizes(rng, 60)
    codes = [rng.randrange(4) for _ in numels]
    table, rows, units = unit_table(numels, codes)
    want = expected_units(numels, codes)
    assert units == len(want) and rows == sum(1 for n in numels if n)
    assert [_cuda.locate(table, rows, units, u) for u in range(units)] == want


@needs_module
def test_locate_across_launch_chunks(seed):
    # more rows than one 32 KB launch takes: the search runs per chunk, units renumbered from 0
    rng = random.Random(seed)
    n = _cuda.large_rows + _cuda.small_rows + 3
    numels = [rng.choice([1, 5, _cuda.unit_elems + 1]) for _ in range(n)]
    codes = [rng.randrange(4) for _ in numels]
    table, rows, units = unit_table(numels, codes)
    want = expected_units(numels, codes)
    picks = sorted(set(rng.sample(range(units), 300)) | {0, units - 1})
    assert [_cuda.locate(table, rows, units, u) for u in picks] == [want[u] for u in picks]
    with pytest.raises(ValueError, match="no such unit"):
        _cuda.locate(table, rows, units, units)


@needs_module
def test_locate_beyond_2_31_elements():
    big, huge = 3_000_000_000, (1 << 33) + 7  # never allocated: the table only holds numbers
    numels, codes = [5, big, huge], [0, 3, 1]
    table, rows, units = unit_table(numels, codes)
    u = _cuda.unit_elems
    big_units = -(-big // u)
    assert _cuda.locate(table, rows, units, big_units) == (1, (big_units - 1) * u, big - (big_units - 1) * u, 3)
    assert _cuda.locate(table, rows, units, units - 1) == (2, (units - 2 - big_units) * u, huge % u, 1)
    assert (units - 2 - big_units) * u > 2**32


@needs_module
@pytest.mark.parametrize("cap", ["small_rows", "large_rows"])
def test_plan_chunks(cap, seed):
    cap = getattr(_cuda, cap)
    rng = random.Random(seed)
    for n in (1, cap - 1, cap, cap + 1, 2 * cap + 7):
        numels = [rng.randrange(1, 3 * _cuda.unit_elems) for _ in range(n)]
        table, rows, units = unit_table(numels, [0] * n)
        chunks = _cuda.plan_chunks(table, rows, units, cap)
        assert [(b, e) for b, e, _ in chunks] == [(b, min(b + cap, n)) for b in range(0, n, cap)]
        per_row = [-(-k // _cuda.unit_elems) for k in numels]
        assert [c for _, _, c in chunks] == [sum(per_row[b:e]) for b, e, _ in chunks]


@needs_module
def test_bad_tables_are_rejected():
    t = _cpu.TensorTable([1 << 40, 2 << 40], [40000, 3], [0, 1])
    other_unit, rows, units, _, _ = t.unit_table(8192)
    with pytest.raises(ValueError, match="kUnitElems"):
        _cuda.locate(other_unit, rows, units, 0)
    table, rows, units = unit_table([40000, 3], [0, 1])
    with pytest.raises(ValueError, match="4 int64 columns"):
        _cuda.locate(table[:-8], rows, units, 0)
    bad_code = bytearray(table)
    struct.pack_into("<q", bad_code, 8 * (3 * rows), 9)  # first row's dtype code
    with pytest.raises(ValueError, match="dtype code"):
        _cuda.plan_chunks(bytes(bad_code), rows, units, _cuda.large_rows)


# ---------------------------------------------------------------- the coefficient


@needs_module
def test_coefficient_is_the_cpu_kernels_coefficient(seed):
    rng = random.Random(seed)
    totals = [0.0, 1e-300, 1e-7, 0.5, 1.0, 1.0 - 1e-7, 3.0, 1e30, 1e300, math.inf, math.nan]
    totals += [rng.lognormvariate(0, 5) for _ in range(200)]
    max_norms = [0.0, 1.0, 0.5, 1e-3, 1e9, math.inf, -1.0, math.nan]
    for code in range(4):
        for total in totals:
            for max_norm in max_norms:
                ours = _cuda.clip_coefficient(total, code, max_norm)
                cpu = _cpu.clip_coefficient(total, code, max_norm)
                assert ours == cpu or (math.isnan(ours) and math.isnan(cpu)), (total, code, max_norm, ours, cpu)
