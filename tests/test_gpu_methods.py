"""CUDA-only checks of the segmented methods on the GPU backends (skipped
without a GPU; their results against torch on CUDA tensors also run through
the per-method test files, whose fixture puts the GPU backends' tensors on
the GPU): no host sync, CUDA-graph capture and replay, run-to-run identity."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastclip

from .helpers import assert_bitwise_equal, assert_no_host_sync, no_host_sync
from .method_refs import random_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [b for b in ("triton", "cuda") if b in fastclip.available_backends()]


@pytest.fixture(params=GPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no GPU backend available"))])
def gpu_backend(request):
    return request.param


def _on_cuda(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().cuda())
        q.grad = p.grad.cuda()
        out.append(q)
    return out


SHAPES = [(64, 300), (32, 16, 3, 3), (300,), (), (1, 500), (9, 5000), (2, 40_000), (0, 4)]


def _calls(params, backend):
    groups = [params[:3], params[3:]]
    return [
        lambda: fastclip.clip_grad_norm_per_tensor_(params, 0.5, backend=backend),
        lambda: fastclip.clip_grad_norm_per_tensor_(params, torch.full((len(params),), 0.3, device="cuda"),
                                                    backend=backend),  # fmt: skip
        lambda: fastclip.clip_grad_norm_per_tensor_(params, torch.full((len(params),), 0.3),  # a host tensor
                                                    backend=backend),  # fmt: skip
        lambda: fastclip.clip_grad_norm_groups_(groups, [0.5, 0.1], backend=backend),
        lambda: fastclip.clip_grad_norm_groups_(groups, torch.tensor([0.5, 0.1]), backend=backend),
        lambda: fastclip.clip_grad_range_(params, -0.01, 0.02, backend=backend),
        lambda: fastclip.adaptive_clip_grad_(params, 0.02, backend=backend),
        lambda: fastclip.grad_stats(params, backend=backend),
    ]


def test_no_host_device_sync(gpu_backend, seed):
    params = _on_cuda(random_params(SHAPES, [torch.float32, torch.bfloat16]))
    assert_no_host_sync(_calls(params, gpu_backend))


def test_cuda_graph_capture_and_replay(gpu_backend, seed):
    params = _on_cuda(random_params([(64, 300), (300,), (9, 5000)], [torch.float32], scale=0.05))
    static = [p.grad for p in params]

    def step():
        norms = fastclip.clip_grad_norm_per_tensor_(params, 0.3, backend=gpu_backend)
        fastclip.adaptive_clip_grad_(params, 0.02, backend=gpu_backend)
        stats = fastclip.grad_stats(params, backend=gpu_backend)
        return norms, stats.total_norm

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on the capture stream (compile, tables, workspaces)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_norms, captured_total = step()
    for _ in range(3):
        fresh = [torch.randn_like(g) * 0.05 for g in static]
        eager = _on_cuda([_cpu_param(p, f) for p, f in zip(params, fresh)])
        for g, f in zip(static, fresh):
            g.copy_(f)
        graph.replay()
        want_norms = fastclip.clip_grad_norm_per_tensor_(eager, 0.3, backend=gpu_backend)
        fastclip.adaptive_clip_grad_(eager, 0.02, backend=gpu_backend)
        want_total = fastclip.grad_stats(eager, backend=gpu_backend).total_norm
        torch.cuda.synchronize()
        assert_bitwise_equal(captured_norms, want_norms)
        assert_bitwise_equal(captured_total, want_total)
        for g, q in zip(static, eager):
            assert_bitwise_equal(g, q.grad)


def _cpu_param(p, grad):
    q = torch.nn.Parameter(p.detach().cpu())
    q.grad = grad.cpu()
    return q


def test_bit_identical_run_to_run(gpu_backend, seed):
    params = _on_cuda(random_params(SHAPES, [torch.float32]))
    first = fastclip.grad_stats(params, backend=gpu_backend)
    for _ in range(4):
        again = fastclip.grad_stats(params, backend=gpu_backend)
        for a, b in zip(first, again):
            assert_bitwise_equal(a, b)


def test_every_method_against_the_cpu_backend(gpu_backend, seed):
    """The GPU backends and the CPU backend give the same results within their accumulation rounding."""
    cpu_params = random_params(SHAPES, [torch.float32, torch.float64], scale=0.05)
    gpu_params = _on_cuda(cpu_params)
    for name, (a, b) in {
        "per_tensor": (fastclip.clip_grad_norm_per_tensor_(cpu_params, 0.5, backend="cpu"),
                       fastclip.clip_grad_norm_per_tensor_(gpu_params, 0.5, backend=gpu_backend)),
        "stats": (fastclip.grad_stats(cpu_params, backend="cpu").per_tensor_norms,
                  fastclip.grad_stats(gpu_params, backend=gpu_backend).per_tensor_norms),
    }.items():  # fmt: skip
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=0, msg=name)
    fastclip.adaptive_clip_grad_(cpu_params, 0.02, backend="cpu")
    fastclip.adaptive_clip_grad_(gpu_params, 0.02, backend=gpu_backend)
    for p, q in zip(cpu_params, gpu_params):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- stateful clippers


def _fresh_grads(static, scale):
    for g in static:
        g.copy_(torch.randn_like(g) * scale)


def test_zclip_never_waits_for_the_device(gpu_backend, seed):
    """Warm-up, the step that sets mean and variance, and the steps after: no host sync."""
    params = _on_cuda(random_params([(64, 300), (300,), (9, 5000)], [torch.float32, torch.bfloat16]))
    fastclip.ZClip(warmup_steps=1, backend=gpu_backend).step(params)  # compile the kernels first
    clip = fastclip.ZClip(warmup_steps=3, max_grad_norm=None, backend=gpu_backend)
    clipped = []  # each step's flag, a device tensor (read after the loop)
    with no_host_sync():
        for step in range(8):
            _fresh_grads([p.grad for p in params], 30.0 if step == 6 else 1.0)
            clip.step(params)
            clipped.append(clip.last_clipped)
    assert bool(clipped[6]) is True  # the spike (no max_grad_norm: nothing else clips it)


@pytest.mark.parametrize(
    "settings",
    [{"max_grad_norm": None}, {"mode": "percentile", "max_grad_norm": 2.0}, {"clip_option": "mean"},
     {"skip_update_on_spike": True, "max_grad_norm": None}],
    ids=["adaptive", "percentile-capped", "mean", "skip-update"],
)  # fmt: skip
def test_zclip_step_in_a_cuda_graph(gpu_backend, settings, seed):
    """A captured ZClip step replays like eager steps of a twin ZClip, statistics included."""
    params = _on_cuda(random_params([(64, 300), (300,), (9, 5000)], [torch.float32], scale=0.05))
    static = [p.grad for p in params]
    twin_params = _on_cuda([_cpu_param(p, p.grad) for p in params])
    clip, twin = (fastclip.ZClip(warmup_steps=2, backend=gpu_backend, **settings) for _ in range(2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up and initialization, eagerly
            clip.step(params)
            twin.step(twin_params)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = clip.step(params)  # recorded, not run: the statistics are those of the eager steps
    for step in range(4):
        fresh = [torch.randn_like(g) * (0.05 if step != 2 else 5.0) for g in static]
        for g, q, f in zip(static, twin_params, fresh):
            g.copy_(f)
            q.grad.copy_(f)
        graph.replay()
        want = twin.step(twin_params)
        torch.cuda.synchronize()
        assert_bitwise_equal(captured, want)
        assert_bitwise_equal(clip.mean, twin.mean)
        assert_bitwise_equal(clip.var, twin.var)
        assert_bitwise_equal(clip.last_coef, twin.last_coef)
        assert_bitwise_equal(clip.last_clipped, twin.last_clipped)
        for g, q in zip(static, twin_params):
            assert_bitwise_equal(g, q.grad)


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
def test_quantile_clip_never_waits_for_the_device(gpu_backend, global_threshold, seed):
    """Empty histories, filling, wrapped rings, a parameter without a grad: no host sync."""
    params = _on_cuda(random_params([(64, 300), (300,), (9, 5000)], [torch.float32, torch.float64]))
    fastclip.QuantileClip(params, backend=gpu_backend).step()  # compile the kernels first
    clip = fastclip.QuantileClip(params, history_length=4, global_threshold=global_threshold, backend=gpu_backend)
    grads = [p.grad for p in params]
    with no_host_sync():
        for step in range(7):
            for p, g in zip(params, grads):
                p.grad = None if step == 2 and p is params[1] else g
            _fresh_grads(grads, 30.0 if step == 5 else 1.0)
            clip.step()
    assert torch.isfinite(clip.last_thresholds).all()


def test_training_step_functions_never_wait_for_the_device(gpu_backend, seed):
    """unscale_clip_grad_norm_ and clip_grad_norm_into_step_ (the calls themselves:
    GradScaler.step of a non-fused optimizer syncs on its own)."""
    params = _on_cuda(random_params([(64, 300), (300,), (9, 5000)], [torch.float32]))
    grads = [p.grad for p in params]
    sgd, adam = torch.optim.SGD(params, lr=0.1), torch.optim.AdamW(params, lr=0.1, fused=True)
    for opt, call in ((sgd, fastclip.unscale_clip_grad_norm_), (adam, None)):
        for step in range(3):
            scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
            scaler.scale(torch.ones((), device="cuda"))
            _fresh_grads(grads, 1.0)
            with no_host_sync() if step else contextlib.nullcontext():  # step 0 compiles
                if call is not None:
                    call(scaler, opt, 0.5, backend=gpu_backend)
                else:
                    fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=gpu_backend)
            scaler.step(opt)
            scaler.update()


def _capture(fn) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def test_captures_a_replay_would_get_wrong_are_refused(gpu_backend, seed):
    """A ZClip warm-up step, ZClip's first step after load_state_dict, and a
    QuantileClip step keep state on the host that a replay would not update:
    captured, they raise, with the grads as they were."""
    params = _on_cuda(random_params([(64, 300), (300,)], [torch.float32], scale=3.0))
    fastclip.clip_grad_norm_(params, 1e9, backend=gpu_backend)  # (kernels compiled outside a capture)
    fastclip.QuantileClip(params, backend=gpu_backend).step()  # (an empty history: clips nothing)
    before = [p.grad.clone() for p in params]
    zclip = fastclip.ZClip(warmup_steps=3, backend=gpu_backend)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        _capture(lambda: zclip.step(params))
    assert zclip.buffer.numel() == 0
    for _ in range(3):
        zclip.step([torch.nn.Parameter(p.detach().clone()) for p in params])  # (no grads: norm 0, nothing written)
    assert zclip.initialized
    restored = fastclip.ZClip(warmup_steps=3, backend=gpu_backend)
    restored.load_state_dict({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in zclip.state_dict().items()})
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        _capture(lambda: restored.step(params))
    quantile = fastclip.QuantileClip(params, history_length=4, backend=gpu_backend)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        _capture(quantile.step)
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)


def test_clip_into_a_step_captured_apart_from_it_is_refused(gpu_backend, seed):
    """clip_grad_norm_into_step_ hands its coefficient to the next step in a
    pre-step hook, which a replay does not run: a clip captured without its
    step, or a step captured without its clip, makes the step raise."""
    params = _on_cuda(random_params([(64, 300), (300,)], [torch.float32], scale=3.0))
    opt = torch.optim.AdamW(params, lr=0.01, fused=True, capturable=True)
    fastclip.clip_grad_norm_into_step_(opt, 0.1, backend=gpu_backend)  # (compiled, and the step's state made,
    opt.step()  # outside a capture)
    _capture(lambda: fastclip.clip_grad_norm_into_step_(opt, 0.1, backend=gpu_backend))
    with pytest.raises(RuntimeError, match="capture both in one CUDA graph, or neither"):
        opt.step()
    fastclip.clip_grad_norm_into_step_(opt, 0.1, backend=gpu_backend)
    with pytest.raises(RuntimeError, match="capture both in one CUDA graph, or neither"):
        _capture(opt.step)
    assert not hasattr(opt, "grad_scale")


def test_clip_into_a_captured_fused_step(gpu_backend, seed):
    """clip_grad_norm_into_step_ + a capturable fused AdamW step in a CUDA graph,
    replayed, against the same steps run eagerly with the clip in place."""
    params = _on_cuda(random_params([(64, 300), (300,)], [torch.float32], scale=0.05))
    twin = _on_cuda([_cpu_param(p, p.grad) for p in params])
    opt = torch.optim.AdamW(params, lr=0.01, fused=True, capturable=True)
    twin_opt = torch.optim.AdamW(twin, lr=0.01, fused=True, capturable=True)
    static = [p.grad for p in params]

    def step():
        fastclip.clip_grad_norm_into_step_(opt, 0.1, backend=gpu_backend)
        opt.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
            fastclip.clip_grad_norm_(twin, 0.1, backend=gpu_backend)
            twin_opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        fresh = [torch.randn_like(g) * 0.05 for g in static]
        for g, q, f in zip(static, twin, fresh):
            g.copy_(f)
            q.grad.copy_(f)
        graph.replay()
        fastclip.clip_grad_norm_(twin, 0.1, backend=gpu_backend)
        twin_opt.step()
        torch.cuda.synchronize()
        for p, q in zip(params, twin):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not hasattr(opt, "grad_scale")
