"""The CUDA C++ backend where there may be no GPU: fastclip._cuda is built
and linked wherever nvcc is (CI has nvcc and no GPU), imports, and says why
it cannot run; the kernels' host-side code is right (the launch table's
packing and chunking, the search every block runs to find its unit, the clip
coefficient); and the kernels themselves match torch: on a GPU, or here on
CPU tensors in their emulation (FASTCLIP_CUDA_EMULATE=1, csrc/cuda/emulation.h),
where the whole contract suite also runs against backend="cuda"."""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import fastclip
from fastclip import _cpu
from fastclip._dispatch import FUSED_BACKENDS

from .helpers import FLOAT_DTYPES, assert_grads_bitwise_equal, clip_total_for, clone_params, reference_norm

try:
    from fastclip import _cuda
except ImportError:
    _cuda = None

def _find_nvcc() -> str | None:
    """nvcc where setup.py's find_nvcc looks for it (CUDA_HOME or CUDA_PATH, PATH, /usr/local/cuda)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


NVCC = _find_nvcc()
HAVE_NVCC = NVCC is not None
needs_module = pytest.mark.skipif(_cuda is None, reason="fastclip._cuda is not built (no nvcc at build time)")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_module_is_built_where_nvcc_is():
    if not HAVE_NVCC:
        pytest.skip("no nvcc on this machine")
    assert _cuda is not None, "nvcc is here, so setup.py must have built fastclip._cuda"
    assert _cuda.archs.split(";") == os.environ.get("FASTCLIP_CUDA_ARCHS", "80;90").split(";")


def test_kernels_on_sm_90_use_no_local_memory_and_global_vector_loads(tmp_path):
    """ptxas's report of every kernel compiled as setup.py compiles them for
    sm_90 (H100, H200): no stack frame and no spilled registers (loads and
    stores to local memory).  It fails on the code before 2026-12-07, where
    segment_reduce_kernel passed its counts array down by a pointer that was
    null unless counting: 16 bytes of stack on sm_90 (and spills on sm_80).
    sm_80 still spills a few registers in norm_kernel and
    segment_apply_kernel, read once per unit, outside the loops over the
    elements (checked in the SASS with triton's cuobjdump), so it is not
    asserted here.  And in the PTX, the kernels that walk the grads with
    16-byte vectors name the global space (the segmented kernels did not
    before 2026-12-07)."""
    if not HAVE_NVCC:
        pytest.skip("no nvcc on this machine")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [NVCC, "-c", "csrc/cuda/kernels.cu", "-o", os.devnull, "-std=c++17", "-O3", "-Icsrc",
           "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "-keep", "-keep-dir", str(tmp_path)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # (`make sanitize`'s runtimes crash nvcc)
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-3000:]
    entries = report.split("Compiling entry function ")[1:]  # one per kernel
    assert len(entries) >= 9, report[-3000:]
    local = {}
    for entry in entries:
        sizes = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", entry)
        assert sizes is not None, entry
        if sizes.groups() != ("0", "0", "0"):
            local[entry.split("'")[1]] = sizes.group(0)
    assert not local, local

    # The grads' 16-byte loads and stores name the global space (generic ones resolve it per access):
    # pointers from kernel parameters are known to be global; grad addresses read from the segment table are
    # told so.  AGC's weights keep generic loads (the same hint for them cost segment_reduce_kernel 4 registers).
    ptx = (tmp_path / "kernels.ptx").read_text()
    starts = [(m.group(1), m.start()) for m in re.finditer(r"\.entry (\w+)\(", ptx)]
    for (name, start), (_, end) in zip(starts, [*starts[1:], ("", len(ptx))]):
        body = ptx[start:end]
        if "segment_finish" in name:  # (a few values per segment)
            continue
        assert re.search(r"\bld\.global(?:\.\w+)*\.v4\.", body), name
        if "segment_reduce" not in name:
            assert not re.search(r"\b(?:ld|st)\.v[24]\.", body), name  # (a generic vector access)


@needs_module
def test_module_links_the_cuda_runtime_statically():
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    deps = subprocess.run(["ldd", _cuda.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in deps and "libtorch" not in deps and "libc10" not in deps


@needs_module
@no_gpu
def test_built_but_not_available_without_a_gpu(monkeypatch):
    monkeypatch.setenv("FASTCLIP_CUDA_EMULATE", "0")
    status = fastclip.backend_info()["cuda"]
    assert status["built"] and not status["available"]
    assert "CUDA" in status["reason"] and status["version"].startswith("CUDA runtime 13.")
    assert "cuda" not in fastclip.available_backends()
    env = {**os.environ, "FASTCLIP_CUDA_EMULATE": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "fastclip", "info"], capture_output=True, text=True, check=True, env=env
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("cuda "))
    assert line.split()[1:3] == ["True", "False"]


@no_gpu
def test_named_cuda_backend_without_a_gpu_raises_and_leaves_grads(monkeypatch, seed):
    monkeypatch.setenv("FASTCLIP_CUDA_EMULATE", "0")
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.randn(5)
    before = p.grad.clone()
    with pytest.raises(fastclip.BackendError, match="backend 'cuda' is not available: "):
        fastclip.clip_grad_norm_([p], 0.1, backend="cuda")
    with pytest.raises(fastclip.BackendError, match="backend 'cuda' is not available: "):
        fastclip.clip_grad_value_([p], 0.1, backend="cuda")
    assert torch.equal(p.grad, before)


@needs_module
@no_gpu
def test_cuda_failures_raise_runtime_errors_naming_the_call():
    with pytest.raises(RuntimeError, match=r"^fastclip\._cuda: cuda(Get|Set)Device failed: cudaError\w+ \("):
        _cuda.device_setup(0)
    table, rows, units = unit_table([100, 20000], [0, 3])
    with pytest.raises(RuntimeError, match="cuda(Get|Set)Device failed"):
        _cuda.clip_norm(0, 0, table, rows, units, 2, 1.0, 0, 8, 8, 8, 1 << 20, 8, True, True)
    with pytest.raises(RuntimeError, match="cuda(Get|Set)Device failed"):
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


# ---------------------------------------------------------------- the kernels against torch

needs_backend = pytest.mark.skipif("cuda" not in fastclip.available_backends(), reason="cuda backend not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the emulation
UNIT = 16384  # fastclip._cuda.unit_elems
SIZES = [1, 0, 4097, UNIT - 1, UNIT, UNIT + 1, 3 * UNIT + 5, 200_003, 17]


def backend():
    return FUSED_BACKENDS["cuda"]


def make(sizes, dtype, scale=1.0, offset=0):
    """Parameters with grads of these sizes; offset > 0 starts each grad that
    many elements into a buffer (contiguous but not 16-byte aligned)."""
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device=DEVICE))
        p.grad = (torch.randn(n + offset, dtype=torch.float64, device=DEVICE) * scale).to(dtype)[offset:]
        params.append(p)
    return params


def check_clip(params, max_norm, launches=None):
    ours, ref = clone_params(params), clone_params(params)
    total = fastclip.clip_grad_norm_(ours, max_norm, backend="cuda")
    if launches is not None:
        assert backend().last_launches == launches
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert total.dtype == ref_total.dtype and total.device == ref_total.device
    exact = reference_norm([p.grad.cpu() for p in params], 2.0)
    eps = torch.finfo(total.dtype).eps
    assert abs(total.double().item() - exact) <= abs(ref_total.double().item() - exact) + eps * exact
    expected = clone_params(params)
    torch.nn.utils.clip_grads_with_norm_(expected, max_norm, clip_total_for(params, 2.0, max_norm, "cuda"))
    assert_grads_bitwise_equal(ours, expected)


@needs_backend
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_one_launch_per_call(monkeypatch, dtype, seed):
    cooperative = backend().setup(torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu"))["cooperative"]
    params = make(SIZES, dtype, scale=3.0)
    for max_norm in (1e9, 0.5):  # not clipping (the scale is skipped on the device), clipping
        check_clip(params, max_norm, launches=1 if cooperative else 2)
    grads = [p.grad for p in params]
    fastclip.get_total_norm(grads, backend="cuda")
    assert backend().last_launches == 1
    fastclip.clip_grads_with_norm_(clone_params(params), 1.0, torch.tensor(5.0, device=DEVICE), backend="cuda")
    assert backend().last_launches == 1
    ours, ref = clone_params(params), clone_params(params)
    fastclip.clip_grad_value_(ours, 0.7, backend="cuda")
    assert backend().last_launches == 1
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    assert_grads_bitwise_equal(ours, ref)
    monkeypatch.setattr(backend(), "cooperative", False)
    check_clip(params, 0.5, launches=2)


@needs_backend
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cooperative_and_two_launch_paths_agree_bit_for_bit(monkeypatch, dtype, seed):
    params = make(SIZES, dtype, scale=3.0)
    one, two = clone_params(params), clone_params(params)
    total_one = fastclip.clip_grad_norm_(one, 1.0, backend="cuda")
    monkeypatch.setattr(backend(), "cooperative", False)
    total_two = fastclip.clip_grad_norm_(two, 1.0, backend="cuda")
    assert torch.equal(total_one, total_two)
    assert_grads_bitwise_equal(one, two)


@needs_backend
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_mixed_dtypes_in_one_launch(norm_type, seed):
    params = make([UNIT + 3, 7], torch.bfloat16) + make([5000], torch.float16) + make([UNIT * 2], torch.float32)
    ours, ref = clone_params(params), clone_params(params)
    total = fastclip.clip_grad_norm_(ours, 0.25, norm_type, backend="cuda")
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 0.25, norm_type)
    exact = reference_norm([p.grad.cpu() for p in params], norm_type)
    assert total.dtype == ref_total.dtype == torch.float32
    assert abs(total.item() - exact) <= abs(ref_total.item() - exact) + 1e-6 * exact
    expected = clone_params(params)
    torch.nn.utils.clip_grads_with_norm_(expected, 0.25, clip_total_for(params, norm_type, 0.25, "cuda"))
    assert_grads_bitwise_equal(ours, expected)


@needs_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_longer_than_one_launch(dtype, seed):
    # more grads than one launch's 1600 rows: two chunks, a norm and a scale launch each
    params = make([64] * 1700 + [200_003, UNIT + 1, 5], dtype)
    for max_norm in (1e9, 0.5):
        check_clip(params, max_norm, launches=4)
    ours, ref = clone_params(params), clone_params(params)
    fastclip.clip_grad_value_(ours, 0.3, backend="cuda")
    assert backend().last_launches == 2
    torch.nn.utils.clip_grad_value_(ref, 0.3)
    assert_grads_bitwise_equal(ours, ref)


@needs_backend
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grads_not_16_byte_aligned(dtype, seed):
    params = make([UNIT * 2 + 3, 100, 1], dtype, offset=1)
    assert params[0].grad.data_ptr() % 16 != 0
    ours, ref = clone_params(params), clone_params(params)
    fastclip.clip_grad_value_(ours, 0.5, backend="cuda")
    torch.nn.utils.clip_grad_value_(ref, 0.5)
    assert_grads_bitwise_equal(ours, ref)
    check_clip(params, 0.5)


@needs_backend
def test_bit_identical_run_to_run(seed):
    grads = [p.grad for p in make([500_009, 4097, 3], torch.float32)]
    first = fastclip.get_total_norm(grads, backend="cuda")
    for _ in range(3):
        assert torch.equal(fastclip.get_total_norm(grads, backend="cuda"), first)


@needs_backend
def test_two_launch_path_does_not_trust_the_counter(monkeypatch, seed):
    # a CUDA graph may replay before the call that would have reset the counter ran
    params = make(SIZES, torch.float32, scale=3.0)
    monkeypatch.setattr(backend(), "cooperative", False)
    fastclip.clip_grad_norm_(clone_params(params), 1.0, backend="cuda")  # creates the workspace
    backend()._workspace(params[0].device).counter.fill_(12345)
    check_clip(params, 0.5, launches=2)


@needs_backend
@pytest.mark.skipif(DEVICE == "cuda", reason="relies on untouched host pages (the emulation on CPU tensors)")
def test_kernels_beyond_2_to_the_31_elements_in_the_emulation(seed):
    """The norm and clamp kernels over one bf16 grad of 2^31 + 40 005
    elements: its last units start past element 2^31 (byte offsets past
    2^32), so the kernels' own index arithmetic is run, not only the host's
    copy of the search (test_locate_beyond_2_31_elements).  All but the tail
    are untouched pages of a fresh allocation, zeros that take no memory;
    the clamp stores only what it changes, so it writes the tail alone."""
    n, k = 1 << 31, 40_005
    grad = torch.empty(n + k, dtype=torch.bfloat16)  # (an mmap: zero pages until written)
    g = torch.Generator().manual_seed(seed)
    tail = (torch.randn(k, generator=g, dtype=torch.float64) * 0.5).to(torch.bfloat16)
    grad[n:] = tail
    total = fastclip.get_total_norm([grad], backend="cuda")
    assert backend().last_launches == 1
    exact = torch.linalg.vector_norm(tail.double()).item()
    assert total.dtype == torch.bfloat16 and abs(total.item() - exact) <= 2**-8 * exact
    fastclip.clip_grad_value_([_Holder(grad)], 0.25, backend="cuda")
    assert torch.equal(grad[n:], tail.clamp(-0.25, 0.25))
    assert grad[n - 1] == 0 and grad[:n].count_nonzero().item() == 0


class _Holder:
    """A parameter stand-in with a .grad (no 4 GB parameter beside the grad)."""

    def __init__(self, grad):
        self.grad = grad
