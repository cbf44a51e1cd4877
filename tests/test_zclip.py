"""fastclip.ZClip against zclip.ZClip 1.0.0 (the package itself) on every backend.

With zclip's norm replaced by fastclip's (and its warm-up clip_grad_norm_ by
fastclip's), both see the same norms, so every grad and every returned norm
must agree bit for bit, step by step (float64 grads: to within a few ulps),
and the mean and variance to within a few float64 ulps: the statistics are the same float64 arithmetic, run as
tensor ops on the device, except that zclip's `x ** 2` and `v ** 0.5` are
libm's pow, which misses x*x and sqrt(v) by an ulp for about one value in a
thousand (seed 1189288319 met one).  Unpatched, they agree within the
rounding of the norm (zclip sums per-parameter float32 norms; fastclip's
norm is fastclip's).
"""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch

import fastclip

from .helpers import assert_bitwise_equal, interpreted
from .method_refs import clipper_shapes

zclip = pytest.importorskip("zclip", reason="zclip is not installed (pip install zclip==1.0.0)")

SETTINGS = [
    {},
    {"mode": "percentile"},
    {"clip_option": "mean"},
    {"skip_update_on_spike": True},
    {"max_grad_norm": None, "warmup_steps": 3},
    {"warmup_steps": 0, "clip_factor": 0.7, "alpha": 0.9},
    {"mode": "percentile", "z_thresh": 1.0, "max_grad_norm": 5.0, "warmup_steps": 1},
    {"clip_option": "mean", "skip_update_on_spike": True, "max_grad_norm": 0.5, "eps": 1e-3},
    {"warmup_steps": 2.5, "mode": "percentile"},  # zclip starts once len(buffer) >= 2.5: after 3 steps
]


def make_pair(shapes, dtypes):
    """Two modules with the same parameters."""
    params = [torch.zeros(s, dtype=dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]
    a = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in params])
    b = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in params])
    return a, b


def set_grads(step, modules, seed, spike_every=11, inf_at=None):
    """The same random grads on every module; every `spike_every`-th step 30x larger."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    scale = 30.0 if step % spike_every == spike_every - 1 else 1.0
    params = list(modules[0].parameters())
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, dtype=torch.float64, generator=g, device="cpu") * 0.1 * scale
        grad = grad.to(device=p.device, dtype=p.dtype)
        if inf_at == step and i == 0 and grad.numel():
            grad.view(-1)[0] = math.inf
        for m in modules:
            list(m.parameters())[i].grad = grad.clone()


def patched_reference(monkeypatch, backend, **settings):
    """zclip.ZClip whose norm and warm-up clip are fastclip's (same backend)."""
    ref = zclip.ZClip(**settings)

    def norm(model):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return float(fastclip.get_total_norm(grads, backend=backend)) if grads else 0.0

    monkeypatch.setattr(ref, "_compute_grad_norm", norm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", functools.partial(fastclip.clip_grad_norm_, backend=backend))
    return ref


def assert_same_state(ours, ref):
    assert ours.initialized == ref.initialized
    if ref.initialized:
        for got, want in ((float(ours.mean), ref.mean), (float(ours.var), ref.var)):  # (libm's pow: see above)
            assert math.isclose(got, want, rel_tol=1e-14, abs_tol=0.0) or (math.isnan(want) and math.isnan(got))
    else:
        assert ours.buffer.tolist() == ref.buffer


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_same_bits_as_zclip_step_by_step(backend, settings, seed, monkeypatch):
    ref = patched_reference(monkeypatch, backend, **settings)
    ours = fastclip.ZClip(**settings, backend=backend)
    a, b = make_pair(clipper_shapes(backend), [torch.float32, torch.bfloat16, torch.float64])
    steps = 40 if not interpreted(backend) else 16
    for step in range(steps):
        set_grads(step, (a, b), seed, spike_every=7 if interpreted(backend) else 11, inf_at=steps - 4)
        want = ref.step(a)
        got = ours.step(b)
        assert isinstance(got, torch.Tensor) and got.dim() == 0
        assert float(got) == want or (math.isnan(want) and math.isnan(float(got)))
        for p, q in zip(a.parameters(), b.parameters()):
            if p.grad.dtype == torch.float64:  # a coefficient an ulp apart (libm's pow) shows in float64 grads
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-14, atol=0.0, equal_nan=True)
            else:
                assert_bitwise_equal(q.grad, p.grad)
        assert_same_state(ours, ref)


@pytest.mark.parametrize("settings", SETTINGS[:4], ids=["defaults", "percentile", "mean", "skip"])
def test_close_to_unpatched_zclip(fused, settings, seed):
    """The real zclip, float32 grads: the norms differ in rounding only."""
    if interpreted(fused):
        pytest.skip("long sequence: native backends")
    ref, ours = zclip.ZClip(**settings), fastclip.ZClip(**settings, backend=fused)
    a, b = make_pair([(128, 64), (64,), (10, 300)], [torch.float32])
    for step in range(60):
        set_grads(step, (a, b), seed)
        want, got = ref.step(a), ours.step(b)
        assert float(got) == pytest.approx(want, rel=1e-5)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
    assert float(ours.mean) == pytest.approx(ref.mean, rel=1e-5)
    assert float(ours.var) == pytest.approx(ref.var, rel=1e-4)


@pytest.mark.parametrize("stop_at", [2, 12], ids=["in-warm-up", "after"])
def test_state_dict_resumes_bit_exactly(backend, stop_at, seed):
    settings = {"warmup_steps": 5, "skip_update_on_spike": True}
    whole, first = fastclip.ZClip(**settings, backend=backend), fastclip.ZClip(**settings, backend=backend)
    a, b = make_pair(clipper_shapes(backend), [torch.float32])
    for step in range(stop_at):
        set_grads(step, (a, b), seed, spike_every=4)
        whole.step(a), first.step(b)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    resumed = fastclip.ZClip(backend=backend)  # other settings: the state dict brings them
    resumed.load_state_dict(torch.load(saved))
    assert resumed.warmup_steps == 5 and resumed.skip_update_on_spike
    for step in range(stop_at, stop_at + 10):
        set_grads(step, (a, b), seed, spike_every=4)
        assert_bitwise_equal(resumed.step(b), whole.step(a))
        for p, q in zip(a.parameters(), b.parameters()):
            assert_bitwise_equal(q.grad, p.grad)
    assert_bitwise_equal(resumed.mean, whole.mean)
    assert_bitwise_equal(resumed.var, whole.var)


def test_statistics_are_device_tensors(backend):
    clip = fastclip.ZClip(warmup_steps=2, max_grad_norm=None, backend=backend)
    p = torch.nn.Parameter(torch.zeros(10))
    for step, scale in enumerate([1.0, 1.1, 1.0, 1000.0]):
        p.grad = torch.full((10,), scale)
        total = clip.step([p])
        stats = clip.stats()
        assert stats["norm"] is total and stats["coef"].dtype == torch.float64
        assert stats["clipped"].dtype == torch.bool and stats["clipped"].device == total.device
    assert bool(stats["clipped"]) and float(stats["coef"]) < 1e-2
    assert float(p.grad.norm()) == pytest.approx(float(stats["coef"]) * float(total), rel=1e-6)


def test_no_grads_gives_a_zero_norm(backend):
    clip = fastclip.ZClip(warmup_steps=1, backend=backend)
    p = torch.nn.Parameter(torch.zeros(3))
    assert float(clip.step([p])) == 0.0 == zclip.ZClip(warmup_steps=1).step(torch.nn.ParameterList([p]))


def test_a_module_without_parameters_is_a_step_without_grads(backend):
    """Deliberate difference: zclip's next(model.parameters()) raises a bare
    StopIteration; fastclip's step is that of a model whose parameters have
    no grads (norm 0, nothing clipped), which is also what it does for an
    empty list."""
    with pytest.raises(StopIteration):
        zclip.ZClip(warmup_steps=1).step(torch.nn.ReLU())
    for empty in (torch.nn.ReLU(), []):
        clip = fastclip.ZClip(warmup_steps=1, backend=backend)
        assert float(clip.step(empty)) == 0.0
        assert not bool(clip.last_clipped)


def test_arguments_checked_like_zclip():
    for kwargs in ({"mode": "other"}, {"clip_option": "max"}, {"mode": "ZSCORE", "clip_option": "Mean"}):
        theirs = ours = None
        try:
            zclip.ZClip(**kwargs)
        except Exception as e:  # noqa: BLE001 - the reference's own exception type
            theirs = e
        try:
            fastclip.ZClip(**kwargs)
        except Exception as e:  # noqa: BLE001
            ours = e
        assert type(ours) is type(theirs) and str(ours) == str(theirs)
    assert fastclip.ZClip(mode="Percentile", clip_option="ignored").clip_option is None


def test_zero_z_thresh_with_adaptive_scaling_refused_up_front():
    """zclip divides by z_thresh once a norm is above the mean (ZeroDivisionError at
    that step); fastclip, which never looks at the norm on the host, refuses it when
    constructed (README: a deliberate difference).  The options that do not divide keep it."""
    theirs = zclip.ZClip(z_thresh=0, warmup_steps=1)
    p = torch.nn.Parameter(torch.zeros(3))
    for scale in (1.0, 2.0):  # warm-up, then a norm above the mean
        p.grad = torch.full((3,), scale)
        if scale == 1.0:
            theirs.step(torch.nn.ParameterList([p]))
        else:
            with pytest.raises(ZeroDivisionError):
                theirs.step(torch.nn.ParameterList([p]))
    for z in (0, 0.0):
        with pytest.raises(ValueError, match="z_thresh must not be 0"):
            fastclip.ZClip(z_thresh=z)
    late = fastclip.ZClip(warmup_steps=1)  # set to 0 afterwards, or loaded so: refused at the next step
    p.grad = torch.ones(3)
    late.step([p])
    for make_zero in (lambda z: setattr(z, "z_thresh", 0), lambda z: z.load_state_dict({**z.state_dict(), "z_thresh": 0.0})):
        make_zero(late)
        before = p.grad.clone()
        with pytest.raises(ValueError, match="z_thresh must not be 0"):
            late.step([p])
        assert torch.equal(p.grad, before)
        late.z_thresh = 2.5
    for kwargs in ({"clip_option": "mean"}, {"mode": "percentile"}):
        ours, ref = fastclip.ZClip(z_thresh=0, warmup_steps=1, **kwargs), zclip.ZClip(z_thresh=0, warmup_steps=1, **kwargs)
        for scale in (1.0, 2.0, 0.5):
            p.grad = torch.full((3,), scale)
            q = torch.nn.Parameter(torch.zeros(3))
            q.grad = p.grad.clone()
            want = ref.step(torch.nn.ParameterList([q]))
            assert float(ours.step([p])) == pytest.approx(want, rel=1e-6)
            assert torch.equal(p.grad, q.grad)


def test_under_torch_compile_the_step_runs_eagerly(seed):
    """A compiled training step that calls ZClip: a graph break, the eager bits."""
    a, b = make_pair([(16, 8), (8,)], [torch.float32])
    eager, compiled = fastclip.ZClip(warmup_steps=2, backend="cpu"), fastclip.ZClip(warmup_steps=2, backend="cpu")

    @torch.compile(backend="eager")
    def step(params):
        return compiled.step(params)

    for i in range(5):
        set_grads(i, (a, b), seed, spike_every=4)
        assert_bitwise_equal(step(list(b.parameters())), eager.step(a))
        for p, q in zip(a.parameters(), b.parameters()):
            assert_bitwise_equal(q.grad, p.grad)


HOST_AND_DEVICE_SETTINGS = SETTINGS + [
    {"eps": 0.0, "warmup_steps": 2},  # constant norms: std 0, so 0/0 and x/0 in the z-score
    {"eps": 0.0, "warmup_steps": 2, "clip_option": "mean", "skip_update_on_spike": True},
    {"z_thresh": 0, "clip_option": "mean", "warmup_steps": 1},
    {"z_thresh": -1.5, "warmup_steps": 1, "max_grad_norm": None},
    {"mode": "percentile", "eps": 0.0, "warmup_steps": 2, "skip_update_on_spike": True},
]
# Each step's grads: the same base grads times a factor (constant norms give std 0),
# or fresh random ones; spikes, a zero step and non-finite steps among them.
FACTORS = [1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 0.0, 1.0, 30.0, 1.0, 1.0, 0.5, math.inf, 1.0, 1.0, -math.nan, 1.0, 1.0]


@pytest.mark.parametrize("fresh", [False, True], ids=["constant", "random"])
@pytest.mark.parametrize(
    "settings", HOST_AND_DEVICE_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults"
)
def test_host_floats_give_the_bits_of_device_tensors(settings, fresh, seed, monkeypatch):
    """On the CPU the post-warm-up arithmetic runs as Python floats; on other devices
    as float64 tensor ops.  Both on the CPU (the tensor path by clearing
    HOST_DEVICE_TYPES for one of them) give the same bits: grads, norm, coefficient,
    whether it clipped, mean and variance, step by step."""
    from fastclip.methods import zclip as module

    # torch's CPU float64 sqrt is not always correctly rounded (an ulp off for rare
    # values, e.g. 28837.388825375594; CUDA's is IEEE, as math.sqrt): the tensor path
    # gets math.sqrt's result here, so the test compares the operations, not torch's CPU sqrt
    ieee_sqrt = staticmethod(lambda t: torch.full_like(t, module._FLOATS.sqrt(float(t))))
    monkeypatch.setattr(module._TENSORS, "sqrt", ieee_sqrt)
    host, device = fastclip.ZClip(**settings, backend="cpu"), fastclip.ZClip(**settings, backend="cpu")
    a, b = make_pair([(33, 7), (5,), (2, 3, 4)], [torch.float32, torch.float64, torch.bfloat16])
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in a.parameters()]
    for step, factor in enumerate(FACTORS * 2):
        if fresh:
            base = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in a.parameters()]
        for p, q, x in zip(a.parameters(), b.parameters(), base):
            p.grad = (x * factor).to(p.dtype)
            q.grad = p.grad.clone()
        want = host.step(a)
        monkeypatch.setattr(module, "HOST_DEVICE_TYPES", ())
        got = device.step(b)
        monkeypatch.setattr(module, "HOST_DEVICE_TYPES", ("cpu",))
        assert_bitwise_equal(got, want)
        for p, q in zip(a.parameters(), b.parameters()):
            assert_bitwise_equal(q.grad, p.grad)
        assert_bitwise_equal(device.last_norm, host.last_norm)
        assert_bitwise_equal(device.last_coef, host.last_coef)
        assert device.last_clipped.dtype == host.last_clipped.dtype == torch.bool
        assert bool(device.last_clipped) == bool(host.last_clipped)
        if host.initialized:
            assert_bitwise_equal(device.mean, host.mean)
            assert_bitwise_equal(device.var, host.var)
            assert host.mean.device == host.last_coef.device == host.last_clipped.device == want.device


@pytest.mark.parametrize("change", [(5, 2, 4), (5, 3, 2), (3, 2, 6), (2, 1, math.inf)], ids=lambda c: "->".join(map(str, c)))
def test_warmup_steps_changed_during_warm_up_as_zclip_reads_it(backend, change, seed, monkeypatch):
    """zclip compares len(buffer) with warmup_steps at every step: raising or
    lowering it (even below the norms recorded) during warm-up, or making it
    infinite, keeps every recorded norm and ends warm-up where zclip does."""
    first, at, then = change
    ref = patched_reference(monkeypatch, backend, warmup_steps=first)
    ours = fastclip.ZClip(warmup_steps=first, backend=backend)
    a, b = make_pair([(3, 5), (7,)], [torch.float32])
    for step in range(10):
        if step == at:
            ref.warmup_steps = ours.warmup_steps = then
        set_grads(step, (a, b), seed, spike_every=4)
        assert float(ours.step(b)) == ref.step(a)
        for p, q in zip(a.parameters(), b.parameters()):
            assert_bitwise_equal(q.grad, p.grad)
        assert_same_state(ours, ref)


def test_a_zero_divisor_continues_where_zclip_raises(seed):
    """Where zclip's Python floats divide by zero (eps=0 with a zero std; a
    negative z_thresh with a norm at the mean) it raises ZeroDivisionError;
    fastclip never reads the statistics on the host (a GPU step would have
    to wait), so it continues with IEEE results there: here a constant norm
    (README: a deliberate difference).  eps=0: a NaN z-score, no spike, the
    statistics stay; then a norm above the mean: an infinite z-score, clipped
    to the mean.  z_thresh=-1: a NaN threshold (0 / -0: zero variance),
    nothing clipped, and the statistics NaN for good; with a variance, a
    threshold of +inf (-σ / -0), nothing clipped, the mean +inf and the
    variance NaN for good."""
    for settings in ({"eps": 0.0, "warmup_steps": 2}, {"z_thresh": -1.0, "warmup_steps": 2}):
        ref, ours = zclip.ZClip(**settings), fastclip.ZClip(**settings)
        p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
        raised = False
        for _ in range(4):
            p.grad, q.grad = torch.full((3,), 0.1), torch.full((3,), 0.1)
            norm = float(ours.step([q]))
            assert math.isclose(norm, 0.1 * 3**0.5, rel_tol=1e-6)
            assert torch.equal(q.grad, torch.full((3,), 0.1))  # nothing clipped
            try:
                ref.step(torch.nn.ParameterList([p]))
            except ZeroDivisionError:
                raised = True
        assert raised
        mean = float(ours.mean)
        if "eps" in settings:
            assert math.isclose(mean, 0.1 * 3**0.5, rel_tol=1e-6) and float(ours.var) == 0.0
            q.grad = torch.full((3,), 0.2)  # above the mean: z = inf, a spike clipped to the mean
            ours.step([q])
            assert math.isclose(q.grad.norm().item(), mean, rel_tol=1e-5)
        else:
            assert math.isnan(mean) and math.isnan(float(ours.var))
    ref, ours = (z(z_thresh=-1.0, warmup_steps=2, max_grad_norm=None) for z in (zclip.ZClip, fastclip.ZClip))
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    for norm in (1.0, 3.0):  # warm-up: mean 2, variance 1
        p.grad, q.grad = torch.tensor([norm]), torch.tensor([norm])
        ref.step(torch.nn.ParameterList([p]))
        ours.step([q])
    p.grad, q.grad = torch.tensor([2.0]), torch.tensor([2.0])  # at the mean: z = 0 > z_thresh, a spike
    with pytest.raises(ZeroDivisionError):
        ref.step(torch.nn.ParameterList([p]))
    ours.step([q])
    assert torch.equal(q.grad, torch.tensor([2.0])) and not bool(ours.last_clipped)
    assert float(ours.mean) == math.inf and math.isnan(float(ours.var))


@pytest.mark.parametrize("warmup_steps", [None, "3"])
def test_a_warmup_steps_zclip_cannot_compare_raises_before_any_write(backend, warmup_steps, seed):
    """zclip compares len(buffer) >= warmup_steps before its warm-up clip: its TypeError, grads untouched."""
    a, b = make_pair([(5, 4), (3,)], [torch.float32])
    set_grads(0, (a, b), seed)
    for p in b.parameters():
        p.grad.mul_(100.0)  # (a clip would change them)
    before = [p.grad.clone() for p in b.parameters()]
    with pytest.raises(TypeError) as theirs:
        zclip.ZClip(warmup_steps=warmup_steps).step(a)
    ours = fastclip.ZClip(warmup_steps=warmup_steps, backend=backend)
    with pytest.raises(TypeError) as mine:
        ours.step(b)
    assert str(mine.value) == str(theirs.value)
    for p, g in zip(b.parameters(), before):
        assert_bitwise_equal(p.grad, g)
    assert ours.buffer.numel() == 0


def test_a_numeric_string_max_grad_norm_clips_in_warm_up_as_zclip(backend, seed):
    """zclip's warm-up hands max_grad_norm to clip_grad_norm_, which takes float() of it."""
    a, b = make_pair([(5, 4), (3,)], [torch.float32])
    set_grads(0, (a, b), seed)
    for p, q in zip(a.parameters(), b.parameters()):
        p.grad.mul_(100.0), q.grad.mul_(100.0)
    want = zclip.ZClip(max_grad_norm="1.0").step(a)
    got = fastclip.ZClip(max_grad_norm="1.0", backend=backend).step(b)
    torch.testing.assert_close(float(got), want, rtol=1e-6, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)


def test_a_bad_state_dict_leaves_the_clipper_as_it_was(seed):
    a, b = make_pair([(5, 4), (3,)], [torch.float32])
    clip = fastclip.ZClip(warmup_steps=2)
    for step in range(4):
        set_grads(step, (a, b), seed)
        clip.step(b)
    good = clip.state_dict()
    for broken in ({k: v for k, v in good.items() if k != "mean"}, {**good, "steps": "x"}, {**good, "mean": 1.5}):
        with pytest.raises((KeyError, ValueError, AttributeError)):
            clip.load_state_dict({**broken, "alpha": 0.5})
        now = clip.state_dict()
        assert now["alpha"] == good["alpha"] and now["steps"] == good["steps"]
        assert_bitwise_equal(now["mean"], good["mean"])
        assert_bitwise_equal(now["var"], good["var"])


def test_a_warm_up_step_refuses_cuda_graph_capture(backend, seed, monkeypatch):
    """A warm-up step keeps its count and record on the host, which a CUDA
    graph's replay would not update: captured, it raises before anything is
    read or written.  After the warm-up a step is tensor ops on the device
    and may be captured: it runs as outside a capture.  (The capture check,
    the GPU backends' own, is forced here; tests/test_gpu_methods.py
    captures for real.)"""
    import fastclip.methods.zclip as module

    in_capture = [True]
    monkeypatch.setattr(module, "capturing", lambda device: in_capture[0])
    a, b = make_pair([(5, 4), (3,)], [torch.float32])
    ours, twin = (fastclip.ZClip(warmup_steps=2, backend=backend) for _ in range(2))
    set_grads(0, (a, b), seed)
    before = [p.grad.clone() for p in a.parameters()]
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        ours.step(a)
    for p, g in zip(a.parameters(), before):
        assert_bitwise_equal(p.grad, g)
    assert ours.buffer.numel() == 0 and not ours.initialized
    for step in range(6):
        set_grads(step, (a, b), seed, spike_every=3)
        in_capture[0] = step >= 2  # the warm-up outside, then "captured" steps
        got = ours.step(a)
        in_capture[0] = False
        assert_bitwise_equal(got, twin.step(b))
        assert ours.initialized == twin.initialized and torch.equal(ours.buffer, twin.buffer)
        if twin.initialized:
            assert_bitwise_equal(ours.mean, twin.mean)
            assert_bitwise_equal(ours.var, twin.var)
        for p, q in zip(a.parameters(), b.parameters()):
            assert_bitwise_equal(p.grad, q.grad)
