"""CUDA-only checks of the GPU backends (skipped without a GPU): results
against torch on CUDA tensors, no host sync, CUDA-graph capture and replay,
a non-default stream, run-to-run determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing

import fastclip

from .helpers import FLOAT_DTYPES, assert_grads_bitwise_equal, assert_no_host_sync, clone_params, reference_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [b for b in ("triton", "cuda") if b in fastclip.available_backends()]


@pytest.fixture(params=GPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no GPU backend available"))])
def gpu_backend(request):
    return request.param


def cuda_params(sizes, dtype, scale=1.0):
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device="cuda"))
        p.grad = (torch.randn(n, dtype=torch.float64, device="cuda") * scale).to(dtype)
        params.append(p)
    return params


UNIT = 8192  # triton_backend.GPU_CONFIG.unit: sizes at, around and across unit boundaries
CUDA_UNIT = 16384  # fastclip._cuda.unit_elems
SIZES = [1, 0, 4097, UNIT, UNIT + 1, 3 * UNIT + 5, 1_000_003, 17, CUDA_UNIT - 1, 3 * CUDA_UNIT + 9]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_clip_grad_norm_like_torch_on_cuda(gpu_backend, dtype, norm_type, seed):
    sizes = [n for n in SIZES if n or norm_type != math.inf]
    params = cuda_params(sizes, dtype)
    for max_norm in (1e9, 0.5):
        ours, ref = clone_params(params), clone_params(params)
        total = fastclip.clip_grad_norm_(ours, max_norm, norm_type, backend=gpu_backend)
        ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
        assert total.dtype == ref_total.dtype and total.device == ref_total.device and total.dim() == 0
        exact = reference_norm([p.grad.cpu() for p in params], norm_type)
        err, torch_err = abs(total.double().item() - exact), abs(ref_total.double().item() - exact)
        assert err <= torch_err + torch.finfo(dtype).eps * exact
        # grads: torch's clip_grads_with_norm_ with the total we clip with
        results = fastclip._dispatch.FUSED_BACKENDS[gpu_backend]._workspace(params[0].device).results
        coef_total = results[1].to(torch.float64 if dtype == torch.float64 else torch.float32)
        expected = clone_params(params)
        torch.nn.utils.clip_grads_with_norm_(expected, max_norm, coef_total)
        assert_grads_bitwise_equal(ours, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_grad_value_bit_for_bit_on_cuda(gpu_backend, dtype, seed):
    params = cuda_params(SIZES, dtype)
    ours, ref = clone_params(params), clone_params(params)
    fastclip.clip_grad_value_(ours, 0.7, backend=gpu_backend)
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    assert_grads_bitwise_equal(ours, ref)


def test_mixed_dtypes_and_views_on_cuda(gpu_backend, seed):
    params = cuda_params([1000, 33], torch.bfloat16) + cuda_params([777], torch.float32)
    base = torch.randn(64, 64, device="cuda")
    view = torch.nn.Parameter(torch.zeros(64, 32, device="cuda"))
    view.grad = base[:, ::2]  # not one dense block
    params.append(view)
    ours = clone_params(params)
    total = fastclip.clip_grad_norm_(ours, 0.1, backend=gpu_backend)
    exact = reference_norm([p.grad.cpu() for p in params], 2.0)
    assert total.dtype == torch.float32 and total.item() == pytest.approx(exact, rel=1e-5)
    clipped = reference_norm([p.grad.cpu() for p in ours], 2.0)
    assert clipped == pytest.approx(0.1, rel=1e-2)


def test_no_host_device_sync(gpu_backend, seed):
    params = cuda_params(SIZES, torch.bfloat16)
    nonempty = [p for p in params if p.numel()]
    total = torch.tensor(3.0, device="cuda")
    calls = [
        lambda: fastclip.clip_grad_norm_(params, 0.5, backend=gpu_backend),
        lambda: fastclip.clip_grad_norm_(nonempty, 1e9, norm_type="inf", backend=gpu_backend),  # (torch's error)
        lambda: fastclip.get_total_norm([p.grad for p in params], backend=gpu_backend),
        lambda: fastclip.clip_grads_with_norm_(params, 1.0, total, backend=gpu_backend),
        lambda: fastclip.clip_grad_value_(params, 0.1, backend=gpu_backend),
    ]
    assert_no_host_sync(calls)  # (each call once first: compile and cache the table)


def test_cuda_graph_capture_and_replay(gpu_backend, seed):
    params = cuda_params([5000, 33, 70_000], torch.float32, scale=10.0)
    static = [p.grad for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on the capture stream (compile, plan, workspace)
            fastclip.clip_grad_norm_(params, 1.0, backend=gpu_backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_total = fastclip.clip_grad_norm_(params, 1.0, backend=gpu_backend)
    for _ in range(3):
        fresh = [torch.randn_like(g) * 10 for g in static]
        for g, f in zip(static, fresh):
            g.copy_(f)
        expected_total = torch.linalg.vector_norm(torch.cat([f.flatten() for f in fresh]))
        graph.replay()
        torch.cuda.synchronize()
        assert captured_total.item() == pytest.approx(expected_total.item(), rel=1e-5)
        clipped = torch.linalg.vector_norm(torch.cat([g.flatten() for g in static]))
        assert clipped.item() == pytest.approx(1.0, rel=1e-4)


def test_non_default_stream(gpu_backend, seed):
    """The grads are written on a side stream that is busy first: a kernel
    launched on any other stream would read them before they are written."""
    params = cuda_params([100_000, 7], torch.float32)
    fresh = [torch.randn_like(p.grad) * 3.0 for p in params]
    ref = clone_params(params)
    for q, f in zip(ref, fresh):
        q.grad.copy_(f)
    fastclip.clip_grad_norm_(clone_params(params), 0.5, backend=gpu_backend)  # compile and load first
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time ahead of the writes
        for p, f in zip(params, fresh):
            p.grad.copy_(f)
        total = fastclip.clip_grad_norm_(params, 0.5, backend=gpu_backend)
    torch.cuda.current_stream().wait_stream(stream)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-5)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_bit_identical_run_to_run(gpu_backend, seed):
    grads = [torch.randn(n, device="cuda") for n in (10_000_019, 4097, 3)]
    first = fastclip.get_total_norm(grads, backend=gpu_backend)
    for _ in range(5):
        assert torch.equal(fastclip.get_total_norm(grads, backend=gpu_backend), first)


def test_auto_picks_a_gpu_backend_for_cuda_grads(monkeypatch, seed):
    from fastclip.backends import torch_ref

    if not GPU_BACKENDS:
        pytest.skip("no GPU backend available")
    calls = []
    monkeypatch.setattr(torch_ref, "clip_grad_norm_", lambda *a, **k: calls.append(a))
    fastclip.clip_grad_norm_(cuda_params([10], torch.float32), 1.0)
    assert calls == []


# ---------------------------------------------------------------- the CUDA C++ backend
# (its results against torch, here and under emulation: tests/test_cuda_backend.py)

needs_cuda_backend = pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="the cuda backend is not available")


@needs_cuda_backend
def test_cuda_launch_counts_seen_by_the_profiler(seed):
    from torch.profiler import ProfilerActivity, profile

    backend = fastclip._dispatch.FUSED_BACKENDS["cuda"]
    params = cuda_params([5000, 33, 70_000, 1_000_003], torch.bfloat16, scale=10.0)
    calls = [
        lambda: fastclip.clip_grad_norm_(params, 1.0, backend="cuda"),
        lambda: fastclip.get_total_norm([p.grad for p in params], backend="cuda"),
        lambda: fastclip.clip_grad_value_(params, 0.1, backend="cuda"),
    ]
    for call in calls:
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        names = ("norm_kernel", "scale_kernel", "clamp_kernel")
        assert backend.last_launches > 0
        assert sum(e.count for e in prof.key_averages() if any(n in e.key for n in names)) == backend.last_launches


def _twin_models(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).cuda()
    twin.load_state_dict(model.state_dict())
    return model, twin


def test_whole_training_step_captured_in_a_cuda_graph(gpu_backend):
    """torch's whole-network capture recipe: forward, backward, clip and a
    capturable Adam step in one graph; replays follow an eager twin."""
    model, twin = _twin_models()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2, capturable=True)
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 10, device="cuda")

    def step(net, optimizer):
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(net(x) * 50, y)
        loss.backward()
        total = fastclip.clip_grad_norm_(net.parameters(), 0.5, backend=gpu_backend)
        optimizer.step()
        return loss, total

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up on a side stream, as torch's recipe asks; the twin takes the same steps
            step(model, opt), step(twin, twin_opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_total = step(model, opt)
    for i in range(4):
        x.copy_(torch.randn_like(x)), y.copy_(torch.randn_like(y))
        graph.replay()
        loss, total = step(twin, twin_opt)
        torch.cuda.synchronize()
        assert static_total.item() > 0.5, "the step should clip"
        assert static_total.item() == pytest.approx(total.item(), rel=1e-5), i
        assert static_loss.item() == pytest.approx(loss.item(), rel=1e-5), i
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_compile_reduce_overhead_step(gpu_backend):
    """torch.compile(mode="reduce-overhead"): Inductor plus CUDA graphs around
    the fastclip custom op, equal to eager."""
    model, twin = _twin_models(1)
    torch._dynamo.reset()

    def update(params):
        total = fastclip.clip_grad_norm_(params, 0.5, backend=gpu_backend)
        with torch.no_grad():
            for p in params:
                p.sub_(0.1 * p.grad)
        return total

    compiled = torch.compile(update, mode="reduce-overhead", fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for i in range(4):
        x = torch.randn(16, 64, device="cuda")
        for net in (model, twin):
            net.zero_grad(set_to_none=False)
            (net(x) * 50).square().mean().backward()
        got = compiled(list(model.parameters())).clone()
        want = update(list(twin.parameters()))
        torch.testing.assert_close(got, want)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    # CUDA graphs were really used (Inductor skips them, e.g. for mutated non-static inputs, and says so here)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], dict(
        torch._dynamo.utils.counters["inductor"]
    )
    torch._dynamo.reset()


def test_compiled_max_norm_schedule_on_cuda(gpu_backend, seed):
    """Under torch.compile (Inductor) a max_norm that changes every call
    compiles twice; the second graph carries it to the op in a host tensor,
    read without waiting on the device: no host sync, the eager bits."""
    torch._dynamo.reset()
    params = cuda_params([3000, 70, 5], torch.float32, scale=2.0)
    eager = clone_params(params)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def fn(ps, max_norm):
        return fastclip.clip_grad_norm_(ps, max_norm, backend=gpu_backend)

    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for i in range(4):
        assert torch.equal(compiled(params, 0.5 + 0.1 * i), fn(eager, 0.5 + 0.1 * i))
        assert_grads_bitwise_equal(params, eager)
    assert_no_host_sync([lambda: compiled(params, 0.95), lambda: compiled(params, 0.97)])
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_reduce_overhead_max_norm_schedule_clips_with_each_value(gpu_backend, seed):
    """mode="reduce-overhead" with a max_norm that changes every call: the
    second graph carries it to the op in a host tensor, read by the op's
    Python, which a CUDA graph replay would not run again (the recorded value
    would stay).  That op is the twin tagged cudagraph_unsafe, which Inductor
    keeps out of its CUDA graphs: every call clips with its own max_norm."""
    torch._dynamo.reset()
    params = cuda_params([3000, 70, 5], torch.float32, scale=2.0)
    eager = clone_params(params)

    def fn(ps, max_norm):
        return fastclip.clip_grad_norm_(ps, max_norm, backend=gpu_backend)

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for i in range(6):
        for p, q in zip(params, eager):  # new grads in place (the graphs' inputs), large enough to clip
            p.grad.copy_(torch.randn_like(p.grad) * 3)
            q.grad.copy_(p.grad)
        max_norm = 0.5 + 0.1 * i
        got = compiled(params, max_norm).clone()  # (a CUDA graph's output is overwritten by its next replay)
        assert torch.equal(got, fn(eager, max_norm)), i
        assert_grads_bitwise_equal(params, eager)
    torch._dynamo.reset()


def test_two_graphs_of_new_layouts_replayed_in_reverse_order(gpu_backend):
    """Each graph captures a method whose table (and segment counters) are
    new in that capture: the second graph, replayed first, must not depend
    on the first having run (tables made in a capture are that graph's; the
    counters are zeroed on the stream in every graph)."""
    first = cuda_params([3000, 70, 5], torch.float32, scale=3.0)
    second = cuda_params([4000, 9], torch.float32, scale=3.0)
    want = [torch.stack([torch.linalg.vector_norm(p.grad) for p in ps]) for ps in (first, second)]
    for sizes in ([3000, 70, 5], [4000, 9]):  # Triton compiles a kernel per row count: not in a capture
        fastclip.grad_stats(cuda_params(sizes, torch.float32), backend=gpu_backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    outs = []
    with torch.cuda.stream(side):  # (no warm-up of these layouts: the captures make their tables)
        graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
        for graph, ps in zip(graphs, (first, second)):
            with torch.cuda.graph(graph, stream=side):
                outs.append(fastclip.grad_stats(ps, backend=gpu_backend).per_tensor_norms)
    torch.cuda.current_stream().wait_stream(side)
    for graph, out, expected in zip(reversed(graphs), reversed(outs), reversed(want)):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_a_table_made_on_one_stream_is_read_on_another(gpu_backend):
    """The cached table of a layout first seen on a side stream, then used on
    the default stream: the second call waits for the copy (an event)."""
    params = cuda_params([5000, 33, 7], torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the copy queued behind a long kernel on the side stream
        first = fastclip.grad_stats(params, backend=gpu_backend).per_tensor_norms
    second = fastclip.grad_stats(params, backend=gpu_backend).per_tensor_norms  # default stream
    torch.cuda.synchronize()
    expected = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
    for out in (first, second):
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
