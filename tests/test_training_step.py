"""unscale_clip_grad_norm_ and clip_grad_norm_into_step_ against torch's AMP
recipe (scaler.unscale_, clip_grad_norm_, scaler.step, scaler.update), on
every backend, over training runs with injected infs and NaNs.

The recipe's clip is fastclip's clip_grad_norm_ on the same backend (torch's
own for backend="torch"; bit for bit torch's for float32 and float64 grads,
tested by the contract suite), so the in-place path must give the same bits:
grads, norms, GradScaler's scale and skipped steps, parameters.  Folding the
clip into a fused optimizer's step divides by 1/coefficient where the recipe
multiplies by the coefficient: parameters agree within rounding, the scale
trajectory exactly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.amp.grad_scaler import OptState

import fastclip

from .helpers import assert_bitwise_equal, interpreted

INJECT = {3: math.inf, 7: math.nan}  # step -> a value put into one grad element


def make_model(backend, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    width = 12 if interpreted(backend) else 48
    return torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)).to(dtype)


def device():
    """Where the tests' tensors go: torch's default device (CUDA for the GPU backends on a GPU machine)."""
    return torch.empty(0).device


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    scale = 300.0 if step % 5 == 4 else 1.0  # some steps clip hard
    x, y = torch.randn(16, 10, generator=g, device="cpu") * scale, torch.randn(16, 3, generator=g, device="cpu")
    return x.to(device(), dtype), y.to(device(), dtype)


def backward(model, scaler, step, inject=INJECT, dtype=torch.float32):
    x, y = batch(step, dtype)
    loss = ((model(x) - y) ** 2).mean()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if step in inject:
        next(model.parameters()).grad.view(-1)[1] = inject[step]


def scaler_for(**kwargs):
    return torch.amp.GradScaler(device().type, init_scale=2.0**12, growth_interval=3, **kwargs)


def step_with(optimizer, scaler):
    """optimizer's step as the recipe takes it: through the scaler (then its update), or plain."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def run(backend, how, optimizer_cls, steps=10, norm_type=2.0, max_norm=0.5, scaled=True, fused=False, dtype=None):
    """Parameters, norms and scales of a short training run: `how` is "torch"
    (the recipe), "unscale" (unscale_clip_grad_norm_) or "into" (clip_grad_norm_into_step_)."""
    model = make_model(backend, dtype=dtype or torch.float32)
    kwargs = {"fused": True} if fused else {}
    opt = optimizer_cls(model.parameters(), lr=0.05, **kwargs)
    scaler = scaler_for() if scaled else None
    norms, scales, grads = [], [], []
    for step in range(steps):
        opt.zero_grad()
        backward(model, scaler, step, dtype=dtype or torch.float32)
        if how == "torch":
            if scaler is not None:
                scaler.unscale_(opt)
            norms.append(fastclip.clip_grad_norm_(model.parameters(), max_norm, norm_type, backend=backend))
        elif how == "unscale":
            norms.append(fastclip.unscale_clip_grad_norm_(scaler, opt, max_norm, norm_type, backend=backend))
        else:
            norms.append(fastclip.clip_grad_norm_into_step_(opt, max_norm, norm_type, scaler=scaler, backend=backend))
        if how != "into":
            grads.append([p.grad.clone() for p in model.parameters()])
        step_with(opt, scaler)
        if scaler is not None:
            scales.append(scaler.get_scale())
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # nothing left behind
    return [p.detach().clone() for p in model.parameters()], norms, scales, grads


def assert_same_run(got, want):
    """The same norms and scales step by step and the same final parameters, bit for bit."""
    assert got[2] == want[2]
    assert len(got[1]) == len(want[1]) and len(got[0]) == len(want[0])
    for a, b in zip(got[1], want[1]):
        assert_bitwise_equal(a, b)
    for a, b in zip(got[0], want[0]):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam], ids=["SGD", "Adam"])
def test_unscale_and_clip_is_torchs_recipe_bit_for_bit(backend, optimizer_cls, norm_type):
    params, norms, scales, grads = run(backend, "torch", optimizer_cls, norm_type=norm_type)
    ours = run(backend, "unscale", optimizer_cls, norm_type=norm_type)
    assert ours[2] == scales  # skipped steps and the scale's back-off and growth
    assert len(set(scales)) >= 2  # it grew and backed off
    for a, b in zip(ours[1], norms):
        assert_bitwise_equal(a, b)
    for ga, gb in zip(ours[3], grads):
        for a, b in zip(ga, gb):
            assert_bitwise_equal(a, b)
    for a, b in zip(ours[0], params):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_unscale_and_clip_other_dtypes(backend, dtype):
    want = run(backend, "torch", torch.optim.SGD, dtype=dtype)
    assert_same_run(run(backend, "unscale", torch.optim.SGD, dtype=dtype), want)


def test_scaler_state_is_what_unscale_leaves(backend):
    model = make_model(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = scaler_for()
    backward(model, scaler, 3)  # an inf
    fastclip.unscale_clip_grad_norm_(scaler, opt, 1.0, backend=backend)
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is OptState.UNSCALED
    (where, found), = state["found_inf_per_device"].items()
    assert where.type == next(model.parameters()).device.type and found.dtype == torch.float32 and found.shape == () and found.item() == 1.0
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called on this optimizer"):
        fastclip.unscale_clip_grad_norm_(scaler, opt, 1.0, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)  # skipped
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) is being called after step\(\)"):
        fastclip.unscale_clip_grad_norm_(scaler, opt, 1.0, backend=backend)
    scaler.update()
    assert scaler.get_scale() == 2.0**11


def test_refusals_leave_grads_and_scaler_untouched(backend):
    model = make_model(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = scaler_for()
    backward(model, scaler, 3)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        fastclip.unscale_clip_grad_norm_(scaler, opt, 1.0, error_if_nonfinite=True, backend=backend)
    for p, g in zip(model.parameters(), grads):  # torch's recipe would have unscaled them (README)
        assert_bitwise_equal(p.grad, g)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY
    first = next(model.parameters())
    if hasattr(first, "grad_dtype"):
        first.grad_dtype = None  # torch >= 2.10 checks a grad's dtype against its parameter's
    first.grad = grads[0].half()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
        fastclip.unscale_clip_grad_norm_(scaler, opt, 1.0, backend=backend)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


@pytest.mark.parametrize("norm_type", [2.0, 3.0], ids=["fused", "torch-recipe"])
@pytest.mark.parametrize("how", ["unscale", "into"])
def test_a_bad_max_norm_raises_before_the_grads_are_unscaled(backend, how, norm_type):
    """torch's recipe unscales, then its clip_grad_norm_ raises for max_norm;
    here the error comes first and a retry works (norm 3: the recipe's path)."""
    model = make_model(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = scaler_for()
    backward(model, scaler, 1)
    grads = [p.grad.clone() for p in model.parameters()]
    call = fastclip.unscale_clip_grad_norm_ if how == "unscale" else None
    for bad, exc in (("abc", ValueError), ([1.0, 2.0], TypeError)):
        with pytest.raises(exc):
            if call is not None:
                call(scaler, opt, bad, norm_type, backend=backend)
            else:
                fastclip.clip_grad_norm_into_step_(opt, bad, norm_type, scaler=scaler, backend=backend)
        for p, g in zip(model.parameters(), grads):
            assert_bitwise_equal(p.grad, g)
        assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY
    fastclip.unscale_clip_grad_norm_(scaler, opt, 1.0, norm_type, backend=backend)  # the retry


def test_fp16_grads_with_a_norm_type_torch_refuses_get_the_fp16_error_first(backend):
    """torch's recipe: unscale_ refuses fp16 grads before clip_grad_norm_ reads norm_type."""
    model = make_model(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = scaler_for()
    backward(model, scaler, 1)
    first = next(model.parameters())
    if hasattr(first, "grad_dtype"):
        first.grad_dtype = None
    first.grad = first.grad.half()
    for norm_type in ("fro", None):
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
            fastclip.unscale_clip_grad_norm_(scaler, opt, 1.0, norm_type, backend=backend)


def test_disabled_scaler_is_clip_grad_norm(backend):
    a, b = make_model(backend), make_model(backend)
    scaler = torch.amp.GradScaler(device().type, enabled=False)
    for m in (a, b):
        backward(m, None, 4, inject={})
    got = fastclip.unscale_clip_grad_norm_(scaler, torch.optim.SGD(a.parameters(), lr=0.1), 0.5, backend=backend)
    assert_bitwise_equal(got, fastclip.clip_grad_norm_(b.parameters(), 0.5, backend=backend))
    for p, q in zip(a.parameters(), b.parameters()):
        assert_bitwise_equal(p.grad, q.grad)


# ---------------------------------------------------------------- folded into a fused step

FUSED_OPTIMIZERS = [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad]


@pytest.mark.parametrize("scaled", [False, True], ids=["no-scaler", "scaler"])
@pytest.mark.parametrize("optimizer_cls", FUSED_OPTIMIZERS, ids=lambda c: c.__name__)
def test_into_a_fused_step_equals_clip_then_step(backend, optimizer_cls, scaled):
    inject = INJECT if scaled else {}
    model_ref, model = make_model(backend), make_model(backend)
    ref_opt = optimizer_cls(model_ref.parameters(), lr=0.05, fused=True)
    opt = optimizer_cls(model.parameters(), lr=0.05, fused=True)
    ref_scaler, scaler = (scaler_for(), scaler_for()) if scaled else (None, None)
    if not getattr(opt, "_step_supports_amp_scaling", False):  # (torch 2.11's fused Adagrad: CPU only, no grad_scale)
        pytest.skip(f"this torch's fused {optimizer_cls.__name__} takes no grad_scale")
    folded = fastclip.methods.training_step.takes_grad_scale(opt)
    assert folded
    for step in range(10):
        for m, o, s in ((model_ref, ref_opt, ref_scaler), (model, opt, scaler)):
            o.zero_grad()
            backward(m, s, step, inject)
        if ref_scaler is not None:
            ref_scaler.unscale_(ref_opt)
        want = fastclip.clip_grad_norm_(model_ref.parameters(), 0.5, backend=backend)
        before = [p.grad.clone() for p in model.parameters()]
        got = fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=backend)
        if backend != "torch":  # the fused path: no grad written before the step
            for p, g in zip(model.parameters(), before):
                assert_bitwise_equal(p.grad, g)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0, equal_nan=True)  # the runs drift in rounding
        for o, s in ((ref_opt, ref_scaler), (opt, scaler)):
            step_with(o, s)
            assert not hasattr(o, "grad_scale") and not hasattr(o, "found_inf")
        if scaled:
            assert scaler.get_scale() == ref_scaler.get_scale()
        for p, q in zip(model.parameters(), model_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        # the next step starts from the recipe's state: rounding differences do not pile up
        model.load_state_dict(model_ref.state_dict())
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (load_state_dict may share tensors)
    opt.zero_grad(), ref_opt.zero_grad()
    for m in (model, model_ref):  # a later step without clipping: nothing of the last call remains
        backward(m, None, 20, inject={})
    opt.step(), ref_opt.step()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert_bitwise_equal(p, q)


def test_into_a_step_of_an_optimizer_without_grad_scale_clips_in_place(backend):
    for scaled in (False, True):
        want = run(backend, "unscale" if scaled else "torch", torch.optim.SGD, scaled=scaled)
        assert_same_run(run(backend, "into", torch.optim.SGD, scaled=scaled), want)


class Forwarding:
    """A wrapper in the style of autoclip's OptimizerWithClipping: attributes
    forwarded to the optimizer inside, whose own step() runs."""

    def __init__(self, optimizer):
        self.__dict__["inner"] = optimizer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, closure=None):
        return self.inner.step(closure)


WRAPPERS = {
    "forwarding": Forwarding,
    "as_optimizer": lambda opt: fastclip.QuantileClip.as_optimizer(opt, quantile=0.5, history_length=3),
}


@pytest.mark.parametrize("scaled", [False, True], ids=["no-scaler", "scaler"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_into_a_wrapped_fused_step_clips_in_place(backend, wrapper, scaled):
    """A wrapper shows the fused optimizer's flag but its step() reads nothing
    from the wrapper: the clip is written into the grads, and the run equals
    torch's recipe on the same wrapper; nothing is left on either object."""
    model_ref, model = make_model(backend), make_model(backend)
    ref_opt = wrapper(torch.optim.AdamW(model_ref.parameters(), lr=0.05, fused=True))
    inner = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    opt = wrapper(inner)
    assert not fastclip.methods.training_step.takes_grad_scale(opt)
    ref_scaler, scaler = (scaler_for(), scaler_for()) if scaled else (None, None)
    for step in range(6):
        for m, o, s in ((model_ref, ref_opt, ref_scaler), (model, opt, scaler)):
            o.zero_grad()
            backward(m, s, step, inject={})
        if ref_scaler is not None:
            ref_scaler.unscale_(ref_opt)
        want = fastclip.clip_grad_norm_(model_ref.parameters(), 0.5, backend=backend)
        got = fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
        for o, s in ((ref_opt, ref_scaler), (opt, scaler)):
            step_with(o, s)
        for o in (opt, inner):
            assert not {"grad_scale", "found_inf"} & set(vars(o))
        for p, q in zip(model.parameters(), model_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    inner.step()  # no hook of ours is left to run


def test_into_a_lightning_optimizer_clips_in_place(backend):
    """Lightning's LightningOptimizer copies the fused optimizer's attributes
    (its flag too) and steps it through the trainer's strategy."""
    lightning = pytest.importorskip("pytorch_lightning.core.optimizer", reason="pytorch-lightning is not installed")
    model_ref, model = make_model(backend), make_model(backend)
    ref_opt = torch.optim.SGD(model_ref.parameters(), lr=0.05, fused=True)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    opt = lightning.LightningOptimizer(inner)
    assert not fastclip.methods.training_step.takes_grad_scale(opt)
    for m in (model_ref, model):
        backward(m, None, 4, inject={})
    want = fastclip.clip_grad_norm_(model_ref.parameters(), 0.5, backend=backend)
    got = fastclip.clip_grad_norm_into_step_(opt, 0.5, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    ref_opt.step(), inner.step()  # what the strategy calls
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    inner.step()
    assert not {"grad_scale", "found_inf"} & (set(vars(opt)) | set(vars(inner)))


def test_into_a_step_called_twice_before_the_step_sees_the_first_clip(backend):
    """torch's recipe clipped the grads at the first call, so a second clip
    sees (and returns the norm of) the clipped grads; the step then equals
    clip, clip, step.  A deferred clip whose step never ran is dropped when a
    new backward replaces the grads."""
    model_ref, model = make_model(backend), make_model(backend)
    ref_opt = torch.optim.AdamW(model_ref.parameters(), lr=0.05, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    for m in (model_ref, model):
        backward(m, None, 4, inject={})  # a step that clips hard
    norms_ref = [fastclip.clip_grad_norm_(model_ref.parameters(), m, backend=backend) for m in (0.5, 0.2)]
    norms = [fastclip.clip_grad_norm_into_step_(opt, m, backend=backend) for m in (0.5, 0.2)]
    torch.testing.assert_close(torch.stack(norms), torch.stack(norms_ref), rtol=1e-5, atol=0)
    ref_opt.step(), opt.step()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # a call whose step never runs, then a new backward: only the new clip reaches the step
    model.load_state_dict(model_ref.state_dict())
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    fastclip.clip_grad_norm_into_step_(opt, 0.5, backend=backend)
    for m, o in ((model_ref, ref_opt), (model, opt)):
        o.zero_grad()
        backward(m, None, 9, inject={})
    want = fastclip.clip_grad_norm_(model_ref.parameters(), 0.3, backend=backend)
    got = fastclip.clip_grad_norm_into_step_(opt, 0.3, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    ref_opt.step(), opt.step()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not {"grad_scale", "found_inf"} & set(vars(opt))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_into_a_step_skipped_then_a_plain_step_runs_without_the_old_clip(backend, set_to_none):
    """A call whose step is skipped (a bad-loss guard: zero_grad, next batch),
    then a step with no call before it: the old coefficient must not reach
    the new grads (torch's recipe clipped grads that are gone)."""
    model_ref, model = make_model(backend), make_model(backend)
    ref_opt = torch.optim.SGD(model_ref.parameters(), lr=0.05, fused=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    backward(model, None, 4, inject={})
    fastclip.clip_grad_norm_into_step_(opt, 0.01, backend=backend)  # clips hard; its step is skipped
    for m, o in ((model_ref, ref_opt), (model, opt)):
        o.zero_grad(set_to_none=set_to_none)
        backward(m, None, 5, inject={})
    ref_opt.step(), opt.step()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert_bitwise_equal(p.detach(), q.detach())
    assert not {"grad_scale", "found_inf"} & set(vars(opt))


def test_into_a_step_then_more_grads_accumulated_drops_the_clip(backend):
    """Grads accumulated in place after a call (a clip per micro-batch)
    cannot take the deferred clip any more: it is dropped (README), and the
    step sees the accumulated grads as they are.  Clipping each micro-batch
    needs clip_grad_norm_; clip_grad_norm_into_step_ belongs after the last
    backward.  (The in-place path, here backend="torch", clips at the call,
    as torch's recipe.)"""
    model_ref, model = make_model(backend), make_model(backend)
    ref_opt = torch.optim.SGD(model_ref.parameters(), lr=0.05, fused=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    backward(model, None, 4, inject={})
    backward(model_ref, None, 4, inject={})
    fastclip.clip_grad_norm_into_step_(opt, 0.01, backend=backend)
    if backend == "torch":
        torch.nn.utils.clip_grad_norm_(model_ref.parameters(), 0.01)
    backward(model, None, 5, inject={}), backward(model_ref, None, 5, inject={})  # accumulated into the same grads
    ref_opt.step(), opt.step()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert_bitwise_equal(p.detach(), q.detach())
    assert not {"grad_scale", "found_inf"} & set(vars(opt))


def test_into_a_step_with_a_scaler_called_twice_raises_and_keeps_the_first(backend):
    """As unscale_ twice: torch's error, and the first call's hand-over to the
    step (grad_scale, the scaler's stage) stays, so scaler.step() still steps right."""
    model_ref, model = make_model(backend), make_model(backend)
    ref_opt = torch.optim.AdamW(model_ref.parameters(), lr=0.05, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    ref_scaler, scaler = scaler_for(), scaler_for()
    for m, s in ((model_ref, ref_scaler), (model, scaler)):
        backward(m, s, 4, inject={})
    ref_scaler.unscale_(ref_opt)
    fastclip.clip_grad_norm_(model_ref.parameters(), 0.5, backend=backend)
    fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=backend)
    deferred = vars(opt).get("_fastclip_into_step_pending")  # (None: the in-place path)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"):
        fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=backend)
    assert vars(opt).get("_fastclip_into_step_pending") is deferred
    for o, s in ((ref_opt, ref_scaler), (opt, scaler)):
        step_with(o, s)
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_into_a_skipped_step_leaves_parameters_and_backs_off(backend):
    model = make_model(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    scaler = scaler_for()
    backward(model, scaler, 7)  # a NaN
    before = [p.detach().clone() for p in model.parameters()]
    total = fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=backend)
    assert math.isnan(float(total))
    scaler.step(opt)
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert scaler.get_scale() == 2.0**11


def _assert_same_parameters(model, model_ref):
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def fused_twins(backend, optimizer_cls=torch.optim.SGD, scaled=True, step=None, dtype=torch.float32):
    """Two equal models, a fused `optimizer_cls` (lr 0.05) on each and, when
    `scaled`, a GradScaler each: (model_ref, model, ref_opt, opt, ref_scaler,
    scaler); with `step`, both have run that step's backward (no injection)."""
    model_ref, model = make_model(backend, dtype=dtype), make_model(backend, dtype=dtype)
    ref_opt = optimizer_cls(model_ref.parameters(), lr=0.05, fused=True)
    opt = optimizer_cls(model.parameters(), lr=0.05, fused=True)
    ref_scaler, scaler = (scaler_for(), scaler_for()) if scaled else (None, None)
    if step is not None:
        for m, s in ((model_ref, ref_scaler), (model, scaler)):
            backward(m, s, step, inject={}, dtype=dtype)
    return model_ref, model, ref_opt, opt, ref_scaler, scaler


def test_into_a_step_with_a_scaler_skipped_then_updated_leaves_nothing_for_the_next_step(backend):
    """A call whose step is skipped (a norm spike guard), scaler.update(), then
    an ordinary AMP step without the call: that step must not divide by the
    old clip's grad_scale (nothing is set on the optimizer before its step)."""
    model_ref, model, ref_opt, opt, ref_scaler, scaler = fused_twins(backend, step=4)
    fastclip.clip_grad_norm_into_step_(opt, 0.01, scaler=scaler, backend=backend)  # clips hard; step skipped
    scaler.update()
    ref_scaler.unscale_(ref_opt)
    ref_scaler.update()
    for m, o, s in ((model_ref, ref_opt, ref_scaler), (model, opt, scaler)):
        o.zero_grad()
        backward(m, s, 5, inject={})
        step_with(o, s)
    _assert_same_parameters(model, model_ref)
    assert scaler.get_scale() == ref_scaler.get_scale()
    assert not {"grad_scale", "found_inf", "_fastclip_into_step_pending"} & set(vars(opt))


def test_into_a_step_after_the_scalers_own_unscale_then_scaler_step(backend):
    """The usual AMP recipe with clip_grad_norm_ swapped for this (no scaler
    argument: the grads are unscaled already): GradScaler.step hands its
    found infs and deletes grad_scale after the step, as usual."""
    model_ref, model, ref_opt, opt, ref_scaler, scaler = fused_twins(backend, torch.optim.AdamW)
    for step in range(6):
        for m, o, s in ((model_ref, ref_opt, ref_scaler), (model, opt, scaler)):
            o.zero_grad()
            backward(m, s, step)
            s.unscale_(o)
        want = fastclip.clip_grad_norm_(model_ref.parameters(), 0.5, backend=backend)
        got = fastclip.clip_grad_norm_into_step_(opt, 0.5, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, equal_nan=True)
        for o, s in ((ref_opt, ref_scaler), (opt, scaler)):
            step_with(o, s)
        _assert_same_parameters(model, model_ref)
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert not {"grad_scale", "found_inf"} & set(vars(opt))


@pytest.mark.parametrize("scaled", [False, True])
def test_into_a_step_with_float64_grads_clips_in_place_exactly(backend, scaled):
    """The step's grad_scale is float32: 1 / coefficient would round float64
    grads to float32's precision, so float64 grads take the in-place path
    (the recipe's own bits)."""
    model_ref, model, ref_opt, opt, ref_scaler, scaler = fused_twins(backend, scaled=scaled, step=4,
                                                                     dtype=torch.float64)  # fmt: skip
    if scaled:
        ref_scaler.unscale_(ref_opt)
    want = fastclip.clip_grad_norm_(model_ref.parameters(), 0.5, backend=backend)
    got = fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=backend)
    assert_bitwise_equal(got, want)
    for o, s in ((ref_opt, ref_scaler), (opt, scaler)):
        step_with(o, s)
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert_bitwise_equal(p.detach(), q.detach())


def test_into_a_step_then_one_grad_rewritten_drops_the_clip(backend):
    """Any grad written after the call (not only the first or the last)
    drops the deferred clip, as the README says."""
    model = make_model(backend)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)
    backward(model, None, 4, inject={})
    fastclip.clip_grad_norm_into_step_(opt, 0.01, backend=backend)
    params = list(model.parameters())
    params[1].grad.add_(1.0)  # a middle grad
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    opt.step()
    for p, b, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), b - g, rtol=1e-6, atol=1e-6)  # unclipped SGD step


def test_into_a_skipped_step_leaves_the_grads_scaled(backend):
    """With a non-finite norm the fused step is skipped (found_inf) and writes
    nothing: the grads stay as the backward left them (scaled), where torch's
    recipe has unscaled and clipped them (inf * 0: NaN, the rest 0); the
    parameters and the scale are the recipe's (README)."""
    model = make_model(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    scaler = scaler_for()
    backward(model, scaler, 3)  # an inf
    grads = [p.grad.clone() for p in model.parameters()]
    fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=backend)
    step_with(opt, scaler)
    folded = fastclip.methods.training_step.takes_grad_scale(opt) and backend != "torch"
    if folded:
        for p, g in zip(model.parameters(), grads):
            assert_bitwise_equal(p.grad, g)
    assert scaler.get_scale() == 2.0**11


def test_unscale_a_float64_grad_whose_squares_overflow_counts_as_non_finite(backend):
    """README (differences): the inf check rides on the norm, so a finite
    float64 grad whose squares overflow float64 counts as non-finite (the
    step is skipped); torch's unscale_ checks element by element and steps."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64, device=device()))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = scaler_for()
    scaler.scale(torch.ones((), device=device()))  # (creates the scale)
    p.grad = torch.tensor([1e200, 1.0, -2.0], dtype=torch.float64, device=device())
    ref_p = torch.nn.Parameter(p.detach().clone())
    ref_p.grad = p.grad.clone()
    ref_opt, ref_scaler = torch.optim.SGD([ref_p], lr=0.1), scaler_for()
    ref_scaler.scale(torch.ones((), device=device()))
    ref_scaler.unscale_(ref_opt)  # torch's recipe: every element is finite
    found_of = lambda s, o: sum(float(v) for v in s._per_optimizer_states[id(o)]["found_inf_per_device"].values())  # noqa: E731
    torch_found = found_of(ref_scaler, ref_opt)
    total = fastclip.unscale_clip_grad_norm_(scaler, opt, 1.0, backend=backend)
    found = found_of(scaler, opt)
    assert torch_found == 0.0 and math.isinf(float(total))
    assert found == (0.0 if backend == "torch" else 1.0)


def test_into_a_step_with_a_scaler_then_grads_written_still_unscales(backend):
    """A grad written after a scaler's call (here a no-op mul_) drops the
    deferred clip, but the step must still divide by the loss scale, as the
    grads it steps on are scaled (a max_norm that does not clip: the result
    is the recipe's)."""
    model_ref, model, ref_opt, opt, ref_scaler, scaler = fused_twins(backend, step=2)
    ref_scaler.unscale_(ref_opt)
    fastclip.clip_grad_norm_into_step_(opt, 1e9, scaler=scaler, backend=backend)
    for p in model.parameters():
        p.grad.mul_(1.0)
    for o, s in ((ref_opt, ref_scaler), (opt, scaler)):
        step_with(o, s)
    _assert_same_parameters(model, model_ref)
    assert not {"grad_scale", "found_inf", "_fastclip_into_step_pending"} & set(vars(opt))


def test_into_a_step_with_a_scaler_then_a_call_without_one(backend):
    """A scaler's call, then a call without the scaler before the step: the
    second sees the grads unscaled and clipped, as torch's recipe leaves them."""
    model_ref, model, ref_opt, opt, ref_scaler, scaler = fused_twins(backend, torch.optim.AdamW, step=4)  # clips hard
    ref_scaler.unscale_(ref_opt)
    want = [fastclip.clip_grad_norm_(model_ref.parameters(), m, backend=backend) for m in (0.5, 0.2)]
    got = [fastclip.clip_grad_norm_into_step_(opt, 0.5, scaler=scaler, backend=backend),
           fastclip.clip_grad_norm_into_step_(opt, 0.2, backend=backend)]  # fmt: skip
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=0)
    for o, s in ((ref_opt, ref_scaler), (opt, scaler)):
        step_with(o, s)
    _assert_same_parameters(model, model_ref)


def test_into_a_step_beside_other_step_hooks_and_a_step_that_raises(backend):
    """The hooks stay registered (torch walks its hook dicts while they run:
    a hook that removed itself would break a post-step hook registered after
    it), and a step that raises after the hand-over leaves no grad_scale for
    the next step."""
    model_ref, model, ref_opt, opt, _, _ = fused_twins(backend, scaled=False)
    backward(model, None, 4, inject={})
    fastclip.clip_grad_norm_into_step_(opt, 0.5, backend=backend)
    seen = []
    opt.register_step_post_hook(lambda *_: seen.append(1))

    def failing_closure():
        raise KeyError("a closure that fails")

    with pytest.raises(KeyError):
        opt.step(failing_closure)
    for m, o in ((model_ref, ref_opt), (model, opt)):
        o.zero_grad()
        backward(m, None, 5, inject={})
        o.step()  # a plain step: the failed one's clip must not reach it
    _assert_same_parameters(model, model_ref)
    assert seen == [1] and not {"grad_scale", "_fastclip_into_step_handed"} & set(vars(opt))
    backward(model, None, 6, inject={})
    fastclip.clip_grad_norm_into_step_(opt, 0.5, backend=backend)
    opt.step()
    assert seen == [1, 1]


def test_into_a_step_keeps_no_grads_of_a_dropped_clip_alive(backend):
    """A call whose step never runs, then zero_grad(set_to_none=True): the old
    grads are freed (the deferred clip holds weak references)."""
    import gc
    import weakref

    model = make_model(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    backward(model, None, 4, inject={})
    old = [weakref.ref(p.grad) for p in model.parameters()]
    fastclip.clip_grad_norm_into_step_(opt, 0.5, backend=backend)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in old)


@pytest.mark.parametrize("captured", ["clip", "step"])
def test_into_a_step_captured_apart_from_its_clip_raises(backend, captured, monkeypatch):
    """The clip reaches the next step through a pre-step hook, which a CUDA
    graph's replay does not run: a clip captured without its step would reach
    only the first step after the capture, and a step captured without its
    clip would keep the coefficient of the capture.  The step raises before it
    changes anything; clip and step captured together run as outside a
    capture.  (The capture check, the GPU backends' own, is forced here;
    tests/test_gpu_methods.py captures for real.)"""
    import fastclip.methods.training_step as module

    in_capture = [False]
    monkeypatch.setattr(module, "capturing", lambda device: in_capture[0])
    model_ref, model, ref_opt, opt, _, _ = fused_twins(backend, scaled=False, step=4)  # (a step that clips hard)
    in_capture[0] = captured == "clip"
    fastclip.clip_grad_norm_into_step_(opt, 0.5, backend=backend)
    in_capture[0] = captured == "step"
    if vars(opt).get(module._PENDING) is None:  # the torch backend clips in place: nothing to hand over
        assert backend == "torch"
        opt.step()
    else:
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="capture both in one CUDA graph, or neither"):
            opt.step()
        for p, q in zip(model.parameters(), before):
            assert_bitwise_equal(p.detach(), q)
        assert not {"grad_scale", "found_inf"} & set(vars(opt))
        in_capture[0] = True  # both "captured"
        fastclip.clip_grad_norm_into_step_(opt, 0.5, backend=backend)
        opt.step()
    in_capture[0] = False
    fastclip.clip_grad_norm_(model_ref.parameters(), 0.5, backend=backend)
    ref_opt.step()
    _assert_same_parameters(model, model_ref)
    assert not {"grad_scale", "found_inf"} & set(vars(opt))
