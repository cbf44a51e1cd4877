"""The C++ CPU kernels directly: every instruction set, thread counts, unit
boundaries, every fp16/bf16 bit pattern, strided runs, overlap detection,
indexing beyond 2**31 elements, fork safety and table validation."""

from __future__ import annotations

import multiprocessing
import os
import types

import pytest
import torch

import fastclip
from fastclip._work import DTYPE_CODES, collect
from fastclip.backends.cpu import _ext

from .helpers import assert_bitwise_equal

pytestmark = pytest.mark.skipif(_ext is None, reason="fastclip._cpu is not built")

ISAS = _ext.available_isas() if _ext is not None else []
UNIT = _ext.unit_elems if _ext is not None else 0


@pytest.fixture(params=ISAS)
def isa(request):
    old = _ext.isa()
    assert _ext.select_isa(request.param)
    yield request.param
    _ext.select_isa(old)


def table_of(tensors):
    work = collect(list(tensors), False)[1]
    assert work is not None
    return work.table


def test_isas_are_known():
    assert "baseline" in ISAS and _ext.isa() in ISAS
    assert not _ext.select_isa("no-such-isa")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_isa_and_thread_count_gives_the_same_bits(dtype, seed):
    sizes = [1, 7, 8, 15, 16, 17, 31, 33, UNIT - 1, UNIT, UNIT + 1, 3 * UNIT + 5, 0, 100_003]
    tensors = [(torch.randn(n, dtype=torch.float64) * 10).to(dtype) for n in sizes]
    tensors += [(torch.randn(2_000_000) * 1e-3).to(dtype)]  # large enough for the threaded path
    table = table_of(tensors)
    results = {}
    old = _ext.isa()
    try:
        for name in ISAS:
            _ext.select_isa(name)
            for threads in (1, 2, 3, 8):
                results[name, threads] = [_ext.norm(table, kind, threads) for kind in (1, 2, 3)]
    finally:
        _ext.select_isa(old)
    first = next(iter(results.values()))
    for key, value in results.items():
        assert value == first, key
    exact = torch.cat([t.double().view(-1) for t in tensors])
    assert first[1] == pytest.approx(
        torch.linalg.vector_norm(exact).item(), rel=1e-6 if dtype in (torch.float16, torch.bfloat16) else 1e-12
    )
    assert first[2] == torch.cat([t.view(-1) for t in tensors]).abs().max().double().item()


def _all_half_bit_patterns(dtype):
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("coef", [1.0, 0.5, 0.7071067690849304, 1e-3, 3.0e-8, 0.0, -1.0])
def test_scale_of_every_16_bit_pattern_matches_torch(isa, dtype, coef):
    x = _all_half_bit_patterns(dtype).clone()
    want = x.clone().mul_(torch.tensor(coef, dtype=torch.float32))
    _ext.scale(table_of([x]), coef, 1)
    assert_bitwise_equal(x, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip_value", [0.0, -0.0, 1.0, 0.1, 1e-6, 60000.0, -2.0, float("inf"), float("nan")])
def test_clamp_of_every_16_bit_pattern_matches_torch(isa, dtype, clip_value):
    x = _all_half_bit_patterns(dtype).clone()
    want = x.clone().clamp_min_(-clip_value).clamp_max_(clip_value)
    _ext.clamp(table_of([x]), clip_value, 1)
    assert_bitwise_equal(x, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_of_every_16_bit_pattern(isa, dtype):
    x = _all_half_bit_patterns(dtype)
    # float32 accumulation (like torch's opmath): bf16 squares beyond 1.8e19 overflow to inf
    finite = x[torch.isfinite(x) & (x.abs() < 1e15)]
    table = table_of([finite])
    want = finite.double()
    assert _ext.norm(table, 2, 1) == pytest.approx(torch.linalg.vector_norm(want).item(), rel=1e-6)
    assert _ext.norm(table, 1, 1) == pytest.approx(want.abs().sum().item(), rel=1e-6)
    assert _ext.norm(table, 3, 1) == want.abs().max().item()
    assert torch.isnan(torch.tensor(_ext.norm(table_of([x]), 3, 1)))  # NaN patterns propagate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_and_clamp_of_special_and_subnormal_values_match_torch(isa, dtype, seed):
    info = torch.finfo(dtype)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            info.tiny,
            -info.tiny,
            info.tiny / 8,
            -info.tiny / 3,
            info.max,
            -info.max,
            float("inf"),
            float("-inf"),
            float("nan"),
            1.0,
            -1.0,
        ],
        dtype=dtype,
    )
    x = torch.cat([special, torch.randn(1000, dtype=dtype) * 10, special * 3])
    for coef in (0.5, 0.999, 1e-30, 0.0, 1.0, -2.0, float("nan")):
        got, want = x.clone(), x.clone()
        want.mul_(torch.tensor(coef, dtype=dtype))
        _ext.scale(table_of([got]), coef, 1)
        assert_bitwise_equal(got, want)
    for clip in (0.0, -0.0, 1.0, 1e-40, 1e300, float("nan"), -3.0):
        got = x.clone()
        want = x.clone().clamp_min_(-clip).clamp_max_(clip) if dtype == torch.float64 or abs(clip) < 3e38 else None
        if want is None:
            continue
        _ext.clamp(table_of([got]), clip, 1)
        assert_bitwise_equal(got, want)


# The streaming loops walk a run as 4 parts in lockstep, in blocks of 4 to 32
# elements (by kernel and instruction set): sizes on both sides of 4 blocks,
# 4 blocks plus a block, 8 blocks, runs shorter than 4 blocks, and odd ones.
STREAM_SIZES = sorted(
    {m * b + d for b in (4, 8, 16, 32) for m in (4, 5, 8) for d in (-1, 0, 1)} | {1, 2, 3, 5, 9, 1003, 4099}
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_kernel_around_the_stream_split(isa, dtype, seed):
    for n in STREAM_SIZES:
        x = (torch.randn(n, dtype=torch.float64) * 3).to(dtype)
        x[torch.randint(n, (1,))] = 50.0  # one value that clamping changes, somewhere
        exact = x.double()
        table = table_of([x])
        rel = 1e-6 if dtype in (torch.float16, torch.bfloat16) else 1e-13
        assert _ext.norm(table, 2, 1) == pytest.approx(torch.linalg.vector_norm(exact).item(), rel=rel), n
        assert _ext.norm(table, 1, 1) == pytest.approx(exact.abs().sum().item(), rel=rel), n
        assert _ext.norm(table, 3, 1) == exact.abs().max().item(), n
        got, want = x.clone(), x.clone().mul_(torch.tensor(0.3, dtype=torch.float64 if dtype == torch.float64 else None))
        _ext.scale(table_of([got]), 0.3, 1)
        assert_bitwise_equal(got, want)
        for clip in (4.0, 1e-3, -0.5):  # few values change; most change; a negative bound (lo > hi)
            got, want = x.clone(), x.clone().clamp_min_(-clip).clamp_max_(clip)
            _ext.clamp(table_of([got]), clip, 1)
            assert_bitwise_equal(got, want)
        before = x.clone()
        _ext.touch_write(table, 1)  # the benchmark floors: the write-back changes nothing
        assert_bitwise_equal(x, before)
        assert _ext.touch_read(table, 1) != 0  # x has a nonzero byte (the 50.0)
        assert _ext.touch_read(table_of([torch.zeros(n, dtype=dtype)]), 1) == 0


def test_mixed_dtypes_in_one_pass(seed):
    tensors = [
        torch.randn(n).to(d)
        for n, d in [(1000, torch.float16), (77, torch.float64), (5000, torch.bfloat16), (33, torch.float32)]
    ]
    table = table_of(tensors)
    want = torch.linalg.vector_norm(torch.cat([t.double() for t in tensors])).item()
    assert _ext.norm(table, 2, 2) == pytest.approx(want, rel=1e-6)
    copies = [t.clone() for t in tensors]
    _ext.scale(table, 0.25, 2)
    for t, c in zip(tensors, copies):
        assert_bitwise_equal(t, c.mul_(torch.tensor(0.25)))


def test_strided_runs_and_their_reduction(seed):
    base = torch.randn(50, 70, dtype=torch.float64)
    view = base[3:47:2, 5:66:3]  # inner stride 3, outer stride 140
    work = collect([view], False)[1]
    assert work._lists[3], "expected a strided layout"
    table = work.table
    assert _ext.norm(table, 2, 1) == pytest.approx(torch.linalg.vector_norm(view).item(), rel=1e-13)
    before = base.clone()
    _ext.scale(table, 0.5, 1)
    mask = torch.zeros_like(base, dtype=torch.bool)
    mask[3:47:2, 5:66:3] = True
    assert torch.equal(base[~mask], before[~mask])
    assert torch.equal(base[mask], (before * 0.5)[mask])


def test_overlap_detection():
    buf = torch.zeros(100)
    assert not _ext.tensors_overlap(table_of([buf[:50], buf[50:]]))
    assert _ext.tensors_overlap(table_of([buf[:51], buf[50:]]))
    assert _ext.tensors_overlap(table_of([buf, buf]))
    assert not _ext.tensors_overlap(table_of([torch.zeros(3), torch.zeros(0), torch.zeros(4)]))


def test_table_validation_errors():
    with pytest.raises(ValueError):
        _ext.TensorTable([1], [1, 2], [0])
    with pytest.raises(ValueError):
        _ext.TensorTable([0], [5], [0])  # null pointer
    with pytest.raises(ValueError):
        _ext.TensorTable([64], [5], [9])  # unknown dtype
    with pytest.raises(ValueError):
        _ext.TensorTable([64], [6], [0], [(0, [2, 2], [2, 1])])  # sizes do not match numel
    with pytest.raises(ValueError):
        _ext.norm(table_of([torch.ones(2)]), 7, 1)


@pytest.mark.parametrize("threading", ["openmp", "pool"])
def test_threading_modes_agree(threading, seed):
    old = _ext.threading()
    if not _ext.set_threading(threading):
        pytest.skip(f"{threading} not built")
    try:
        tensors = [torch.randn(3_000_000), torch.randn(1_000_001).bfloat16()]
        table = table_of(tensors)
        results = {t: _ext.norm(table, 2, t) for t in (1, 2, 5)}
        assert len(set(results.values())) == 1
        copies = [t.clone() for t in tensors]
        _ext.scale(table, 0.5, 4)
        for t, c in zip(tensors, copies):
            assert_bitwise_equal(t, c.mul_(0.5))
    finally:
        _ext.set_threading(old)


_FORK_INPUT = {}


def _norm_in_child(queue):
    # only fastclip runs here: torch's own OpenMP pool is not usable after fork()
    queue.put(_ext.norm(_FORK_INPUT["table"], 2, 2))


def test_threads_work_after_fork():
    t = torch.ones(4_000_000)
    _FORK_INPUT["table"] = table_of([t])
    _ext.norm(_FORK_INPUT["table"], 2, 2)  # start fastclip's pool in the parent
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_norm_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 2000.0
    _FORK_INPUT.clear()


def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.bigmem
@pytest.mark.skipif(_mem_available_gib() < 12, reason="needs about 9 GiB of free memory")
def test_more_than_2_to_the_31_elements():
    n = 2**31 + 77
    x = torch.zeros(n, dtype=torch.bfloat16)  # 4 GiB, zero pages until written
    x[-1], x[-40], x[2**31 + 3] = 3.0, -4.0, 12.0
    x[5] = 0.5
    table = table_of([x])
    assert _ext.norm(table, 2, 2) == pytest.approx((9 + 16 + 144 + 0.25) ** 0.5)
    assert _ext.norm(table, 1, 2) == 19.5
    assert _ext.norm(table, 3, 2) == 12.0
    _ext.clamp(table, 3.5, 2)  # writes only the vectors that change
    assert (x[-40].item(), x[2**31 + 3].item(), x[-1].item()) == (-3.5, 3.5, 3.0)
    p = types.SimpleNamespace(grad=x)  # clip_grad_norm_ only reads .grad
    total = fastclip.clip_grad_norm_([p], 1.0)
    assert total.item() == pytest.approx((9 + 12.25 + 12.25 + 0.25) ** 0.5, rel=1e-2)
    assert x[-1].item() == pytest.approx(3.0 * 1.0 / total.item(), rel=1e-2)
    del x, p


def test_dtype_codes_match_the_extension():
    for dtype, code in DTYPE_CODES.items():
        t = torch.ones(3, dtype=dtype)
        assert _ext.collect([t], False, DTYPE_CODES, torch.Tensor, torch.nn.Parameter)[1].dtypes == [code]


@pytest.fixture(params=["dlpack", "attributes"])
def gather(request):
    """Both ways the C++ gather reads tensors: DLPack's exchange API, or attributes."""
    capsule = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)
    if request.param == "dlpack" and capsule is None:
        pytest.skip("this torch has no DLPack C exchange API")
    _ext.set_dlpack_exchange_api(capsule if request.param == "dlpack" else None)
    yield request.param
    _ext.set_dlpack_exchange_api(capsule)


class _Subclass(torch.Tensor):
    pass


def test_fast_gather_leaves_unusual_tensors_to_the_general_path(gather):
    unusual = [
        torch.ones(3, 3).t(),
        torch.ones(4, 4)[:, 1:3],
        torch.ones(3).to_sparse(),
        torch.ones(3, dtype=torch.complex64),
        torch.ones(3, dtype=torch.int64),
        torch.ones(3, device="meta"),
        torch.ones(3).as_subclass(_Subclass),  # (a subclass; nn.Parameter is read as a plain tensor)
    ]
    for t in unusual:
        tensors, table, _, _ = _ext.collect([torch.ones(2), t], False, DTYPE_CODES, torch.Tensor, torch.nn.Parameter)
        assert table is None and len(tensors) == 2 and tensors[1] is t
    weight = torch.nn.Parameter(torch.ones(3))  # get_total_norm(model.parameters()): read as a tensor
    _tensors, table, _, _ = _ext.collect([torch.ones(2), weight], False, DTYPE_CODES, torch.Tensor, torch.nn.Parameter)
    assert table is not None and table.numels == [2, 3] and table.ptrs[1] == weight.data_ptr()


def test_fast_gather_tables(gather, seed):
    base = torch.randn(100)
    tensors = [
        torch.randn(3, 4),
        base[10:20],
        torch.zeros(0),
        torch.tensor(1.5),
        torch.randn(5, 1, 2).half(),
        torch.randn(7).bfloat16(),
        torch.randn(2, 2).double(),
        torch.ones(1, 6).t(),
    ]
    got, table, mask, device = _ext.collect(tensors, False, DTYPE_CODES, torch.Tensor, torch.nn.Parameter)
    assert device == -1  # the CPU
    assert got == tensors and table is not None
    assert table.ptrs == [t.data_ptr() for t in tensors]
    assert table.numels == [t.numel() for t in tensors]
    assert table.dtypes == [DTYPE_CODES[t.dtype] for t in tensors]
    assert mask == sum(1 << c for c in set(table.dtypes))
    # from parameters: None grads skipped, AttributeError for non-parameters
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    ps[0].grad, ps[2].grad = torch.ones(2), torch.ones(2)
    got, table, _, _ = _ext.collect(ps, True, DTYPE_CODES, torch.Tensor, torch.nn.Parameter)
    assert got == [ps[0].grad, ps[2].grad] and len(table) == 2
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'grad'"):
        _ext.collect([ps[0], (1, 2)], True, DTYPE_CODES, torch.Tensor, torch.nn.Parameter)


def test_clip_through_the_attribute_gather(gather, seed):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(30, 20), (7,), (0,)]]
    for p in params:
        p.grad = torch.randn(p.shape) * 3
    ref = [torch.nn.Parameter(torch.zeros(p.shape)) for p in params]
    for p, q in zip(params, ref):
        q.grad = p.grad.clone()
    total = fastclip.clip_grad_norm_(params, 1.0)
    torch.nn.utils.clip_grads_with_norm_(ref, 1.0, total)
    for p, q in zip(params, ref):
        assert_bitwise_equal(p.grad, q.grad)


def test_env_var_forces_the_isa():
    code = "import fastclip.backends.cpu as c; print(c._ext.isa())"
    for name in ISAS:
        out = os.popen(f"FASTCLIP_CPU_ISA={name} {os.sys.executable} -c '{code}'").read().strip()
        assert out == name
