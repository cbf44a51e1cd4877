"""The clip folded into the training step: AMP's unscale_ and the clip in one
read and one write, or the clip handed to a fused optimizer's own pass.

torch's recipe with AMP is `scaler.unscale_(opt)` (read and write every
grad), `clip_grad_norm_` (read them, then read and write them), then the
optimizer's pass.  The norm of the unscaled grads is the norm of the scaled
ones times the inverse scale (exactly, for the power-of-two scales GradScaler
uses), and a non-finite element makes that norm non-finite, so one read gives
both the norm and GradScaler's inf check:

  unscale_clip_grad_norm_   one read, then one pass multiplying by
                            inv_scale * coefficient (the same bits as unscaling
                            then clipping when the scale is a power of two);
  clip_grad_norm_into_step_ one read and no write: torch's fused optimizers
                            (Adam, AdamW, SGD, Adagrad with fused=True) divide
                            every grad by `optimizer.grad_scale` and skip the
                            step on `found_inf` inside their own pass, the hook
                            GradScaler itself uses; the coefficient goes there.

The scaler's per-optimizer state is left as unscale_ leaves it (found inf per
device, stage UNSCALED), so scaler.step() skips a non-finite step and
scaler.update() backs off and grows the scale as after torch's recipe.
Whatever the fused kernels do not take (grads on several devices, sparse or
complex grads, other norm types, backend="torch") runs torch's recipe itself.
"""

from __future__ import annotations

import inspect
import weakref
from typing import NamedTuple

import torch

from .. import _api, _dispatch
from .._errors import nonfinite_message
from .._no_grad import no_grad
from ..backends.base import FUSED_NORM_KINDS
from ..backends.gpu_common import capturing
from ._whole import eager_under_compile, gather

_HOOK = "_fastclip_into_step_hooks"  # the optimizer's step hooks that hand the clip over and clean up after it
_PENDING = "_fastclip_into_step_pending"  # the clip deferred to the next step (_Pending)
_HANDED = "_fastclip_into_step_handed"  # the grad_scale handed to the step now running


def _params(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _plan(params: list, norm_type, backend, process_group) -> tuple:
    """(the grads, (fused backend, GradList, norm kind)) for plain grads on
    one device, else (the grads, None): torch's recipe."""
    name = _dispatch.resolve_name(backend)
    try:
        kind = FUSED_NORM_KINDS.get(float(norm_type))
    except (TypeError, ValueError):
        kind = None  # torch's recipe: its error, after unscale_'s own checks (_check_clip_arguments)
    grads, fused, work = gather(params, "torch" if kind is None else name, process_group)
    if fused is not None and work.scales_unlike_torch(work.result_dtype):  # (see GradList): torch's recipe
        fused = None
    return grads, (None if fused is None else (fused, work, kind))


def _scaler_state(scaler, optimizer, action: str) -> dict:
    """The scaler's state for this optimizer after unscale_'s checks (torch's messages)."""
    from torch.amp.grad_scaler import OptState

    scaler._check_scale_growth_tracker(action)
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    return state


def _check_clip_arguments(max_norm, norm_type) -> None:
    """What torch's clip_grad_norm_ raises for these (float() of each), before
    unscale_ touches the grads and the scaler's state."""
    float(norm_type)
    float(max_norm)


def _check_fp16(grads) -> None:
    if any(g.dtype == torch.float16 for g in grads):  # GradScaler's own refusal, before anything is touched
        raise ValueError("Attempting to unscale FP16 gradients.")


def _norms(plan, max_norm, scaler, error_if_nonfinite, norm_type):
    """One read of the grads: (total norm of the unscaled grads, coefficient,
    inverse scale or None, found-inf flag or None), all on the grads' device."""
    fused, work, kind = plan
    _api._check_no_empty_for_inf(work, kind, None)
    wide = fused.norm_wide(work, kind)  # float64, of the grads as they are (scaled)
    inv = found = None
    if scaler is not None:
        # GradScaler's inverse scale, in float32 (it takes the reciprocal in float64)
        inv = scaler._scale.double().reciprocal().float().to(wide.device, non_blocking=True)
        found = (~torch.isfinite(wide)).float()  # an inf or NaN element makes the norm non-finite
        wide = wide * inv.double()
    total = wide.to(work.result_dtype)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(nonfinite_message(float(norm_type)))
    # torch's expression and rounding, on the total as fastclip's clip_grad_norm_
    # takes it: float32 (fp16/bf16 grads too), float64 when the norm is
    coef_total = wide.to(torch.float64 if work.result_dtype == torch.float64 else torch.float32)
    coef = torch.clamp(float(max_norm) / (coef_total + 1e-6), max=1.0)
    return total, coef, inv, found


@no_grad
@eager_under_compile  # state on the host: under torch.compile this runs eagerly
def unscale_clip_grad_norm_(
    scaler, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=False, *, backend=None, process_group=None
) -> torch.Tensor:
    """``scaler.unscale_(optimizer)`` then ``clip_grad_norm_`` of the optimizer's
    parameters, in one read and one write of the grads.

    Returns the total norm of the unscaled grads (before clipping), as
    clip_grad_norm_ does.  The scaler's state for `optimizer` is what
    unscale_ leaves (found inf per device, stage UNSCALED): call
    ``scaler.step(optimizer)`` and ``scaler.update()`` after it as usual.
    With a disabled scaler this is clip_grad_norm_.  Differences from torch's
    recipe: ``error_if_nonfinite`` raises before anything is touched (torch
    has unscaled the grads by then); with a scale that is not a power of two
    the product inv_scale * coefficient rounds once where torch rounds twice.
    DTensor grads and ``process_group`` (the norm of the whole, as in
    clip_grad_norm_) run torch's recipe with fastclip's clip_grad_norm_.
    """
    params = _params(optimizer)
    clip = lambda: _api.clip_grad_norm_(  # noqa: E731 - fastclip's torch-exact clip_grad_norm_
        params, max_norm, norm_type, error_if_nonfinite, backend=backend, process_group=process_group
    )
    if not scaler.is_enabled():
        return clip()
    state = _scaler_state(scaler, optimizer, "unscale_")
    grads, plan = _plan(params, norm_type, backend, process_group)
    _check_fp16(grads)
    if plan is None:  # torch's recipe, its errors raised before unscale_ touches anything
        if error_if_nonfinite:  # (a read more; the check syncs anyway)
            norm = _api.get_total_norm(grads, norm_type, backend=backend, process_group=process_group)
            if not bool(torch.isfinite(norm)):
                raise RuntimeError(nonfinite_message(float(norm_type)))
        _check_clip_arguments(max_norm, norm_type)
        scaler.unscale_(optimizer)
        return clip()
    total, coef, inv, found = _norms(plan, max_norm, scaler, error_if_nonfinite, norm_type)
    fused, work, _kind = plan
    multiplier = inv.double() * coef.double()  # exact: inv is a power of two
    if not fused.scale(work, multiplier):
        torch._foreach_mul_(work.tensors, multiplier)
    _set_unscaled(state, {work.device: found})
    return total


def _set_unscaled(state: dict, found_inf_per_device: dict) -> None:
    from torch.amp.grad_scaler import OptState

    state["found_inf_per_device"] = found_inf_per_device
    state["stage"] = OptState.UNSCALED


def takes_grad_scale(optimizer) -> bool:
    """Does optimizer.step() divide the grads by `optimizer.grad_scale` and skip
    on `optimizer.found_inf` (torch's fused optimizers)?  The step must be
    torch's own: a wrapper that shows the flag of the optimizer inside it
    (Lightning's LightningOptimizer copies its attributes, autoclip-style
    OptimizerWithClipping forwards them) has a step that would read
    grad_scale from that inner optimizer, not from the wrapper."""
    step = getattr(type(optimizer), "step", None)
    return (
        isinstance(optimizer, torch.optim.Optimizer)
        and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        and getattr(step, "__module__", "").startswith("torch.optim.")
        and "grad_scaler" not in inspect.signature(optimizer.step).parameters
    )


@no_grad
@eager_under_compile  # state on the host: under torch.compile this runs eagerly
def clip_grad_norm_into_step_(
    optimizer, max_norm, norm_type=2.0, *, scaler=None, backend=None, process_group=None
) -> torch.Tensor:
    """Clip the grads of `optimizer`'s parameters inside its next step().

    One read computes the total norm (of the unscaled grads when `scaler` is
    given) and no grad is written here: for optimizers that take
    ``grad_scale`` / ``found_inf`` (torch's fused Adam, AdamW, SGD, Adagrad)
    the coefficient goes to ``optimizer.grad_scale`` when the step starts (as
    1 / coefficient, times the loss scale with a scaler), and the step
    divides each grad by it in its own pass.  Call ``scaler.step(optimizer)``
    (or ``optimizer.step()`` without a scaler) next; no grad_scale is left on
    the optimizer after that step, and a step that runs on other grads (the
    call's step skipped, then zero_grad and a new backward) or after
    ``scaler.update()`` runs without it.  Other optimizers and float64 grads
    get the in-place path (:func:`unscale_clip_grad_norm_`, or
    clip_grad_norm_ without a scaler).  A non-finite norm behaves as in
    torch's recipe: with a scaler the step is skipped (found_inf) and the
    scale backs off; without one the coefficient (0 or NaN) reaches the
    parameters as it would through the grads.  Returns the total norm before
    clipping.  DTensor grads and ``process_group``: the in-place path.
    """
    if scaler is not None and not scaler.is_enabled():
        scaler = None  # unscale_ does nothing and scaler.step() runs a plain step
    _apply_pending(optimizer, scaler)
    params = _params(optimizer)
    folds = takes_grad_scale(optimizer) and (scaler is None or _scaler_respects_grad_scale())
    grads, plan = _plan(params, norm_type, backend, process_group) if folds else (None, None)
    if plan is not None and torch.float64 in plan[1].dtypes:
        plan = None  # (the step's grad_scale is float32: 1 / coefficient would round float64 grads to it)
    if plan is None:
        if scaler is not None:
            return unscale_clip_grad_norm_(
                scaler, optimizer, max_norm, norm_type, backend=backend, process_group=process_group
            )
        return _api.clip_grad_norm_(params, max_norm, norm_type, backend=backend, process_group=process_group)
    state = None
    if scaler is not None:
        state = _scaler_state(scaler, optimizer, "unscale_")
        _check_fp16(grads)
    total, coef, inv, found = _norms(plan, max_norm, scaler, False, norm_type)
    divisor = coef.float().reciprocal()  # the fused step divides each grad by grad_scale
    loss_scale = None
    if state is not None:
        # the grads are still scaled: the divisor carries the loss scale.  With the
        # stage UNSCALED, scaler.step() hands the found infs to the step and
        # deletes grad_scale and found_inf after it.
        loss_scale = scaler._scale.float().to(divisor.device, non_blocking=True)
        divisor = loss_scale * divisor
        _set_unscaled(state, {plan[1].device: found})
    _defer(optimizer, _Pending(coef, divisor, [weakref.ref(g) for g in grads], _versions(grads),
                               scaler if state is not None else None, state, loss_scale, inv,
                               capturing(divisor.device)))  # fmt: skip
    return total


_RESPECTS_GRAD_SCALE: list = []  # cached answer of _scaler_respects_grad_scale()


def _scaler_respects_grad_scale() -> bool:
    """Does GradScaler.step() pass an optimizer's own grad_scale to the step
    unchanged after unscale_ (torch >= 2.5: pytorch#123429)?  Older versions
    replace it, and the coefficient would be lost: found out once, on the CPU,
    with a stand-in optimizer."""
    if not _RESPECTS_GRAD_SCALE:

        class Probe(torch.optim.Optimizer):
            _step_supports_amp_scaling = True

            def __init__(self):
                super().__init__([torch.zeros(1, requires_grad=True)], {})

            def step(self, closure=None):
                self.seen = getattr(self, "grad_scale", None)

        answer = False
        try:
            scaler, probe = torch.amp.GradScaler("cpu", init_scale=2.0), Probe()
            scaler.scale(torch.ones(()))  # creates the scale
            _set_unscaled(_scaler_state(scaler, probe, "unscale_"), {torch.device("cpu"): torch.zeros(())})
            probe.grad_scale = torch.full((), 3.0)
            scaler.step(probe)
            answer = probe.seen is not None and float(probe.seen) == 3.0
        except Exception:  # noqa: BLE001 - any failure: take the in-place path
            answer = False
        _RESPECTS_GRAD_SCALE.append(answer)
    return _RESPECTS_GRAD_SCALE[0]


class _Pending(NamedTuple):
    """A clip deferred to the optimizer's next step."""

    coef: torch.Tensor  # the clip coefficient
    divisor: torch.Tensor  # what the step divides the grads by: 1 / coef (times the loss scale with a scaler)
    grads: list  # weak references to the grads it was computed for (a dropped clip keeps none alive)
    versions: tuple  # their version counters then
    scaler: object  # the GradScaler of the call, or None
    scaler_state: dict | None  # its state for the optimizer, which the call set UNSCALED
    loss_scale: torch.Tensor | None  # with a scaler: its scale, and the inverse the call unscaled by
    inv_scale: torch.Tensor | None
    captured: bool  # was the call captured in a CUDA graph?  (its step must be too, or neither)


def _defer(optimizer, pending: _Pending) -> None:
    """Keep the clip for the next step: a pre-step hook hands it to the step
    as `grad_scale`, and a post-step hook removes it after the step.
    Nothing is set on the optimizer before its step, so a call whose step
    never runs (a skipped step, then zero_grad, a new backward, scaler.update())
    leaves nothing that a later step, or GradScaler.step, could pick up:
    torch's recipe clipped grads that are gone, and the step runs without it.
    The two hooks are registered once per optimizer and stay (a hook that
    removed itself would change torch's hook dict while torch walks it)."""
    optimizer.__dict__[_PENDING] = pending
    if vars(optimizer).get(_HOOK) is None:
        optimizer.__dict__[_HOOK] = (
            optimizer.register_step_pre_hook(_hand_over),
            optimizer.register_step_post_hook(_after_step),
        )


def _hand_over(optimizer, _args, _kwargs) -> None:
    """Pre-step hook: the deferred clip's divisor into `grad_scale`, if it still holds.

    GradScaler.step has set grad_scale already: None after unscale_ (the stage
    this function's scaler path sets), its scale otherwise (grads unscaled in
    the step); the clip multiplies in.  With a scaler, if the grads were
    written since the call (in the same scaler iteration), the clip no longer
    applies but the unscale still must: the step divides by the loss scale
    alone, as torch's recipe would unscale the grads it steps on."""
    _clear_stale_hand_over(optimizer)
    pending = optimizer.__dict__.pop(_PENDING, None)
    if pending is None or not _same_iteration(optimizer, pending):
        return
    if pending.captured != capturing(pending.divisor.device):
        # A replay runs no hook: a captured clip would reach only the first step after the
        # capture, and a captured step would keep reading the divisor of the call it was captured with.
        raise RuntimeError(
            "clip_grad_norm_into_step_ hands its coefficient to the optimizer's next step: capture both "
            f"in one CUDA graph, or neither (the clip was {'' if pending.captured else 'not '}captured, "
            f"the step is {'' if not pending.captured else 'not '}being captured)"
        )
    divisor = pending.divisor if _unchanged(optimizer, pending) else pending.loss_scale
    if divisor is None:
        return
    handed = optimizer.__dict__.get("grad_scale")
    optimizer.grad_scale = divisor if handed is None else handed * divisor
    optimizer.__dict__[_HANDED] = optimizer.grad_scale


def _after_step(optimizer, _args, _kwargs) -> None:
    """Post-step hook: remove the grad_scale the pre-step hook set (GradScaler.step
    deletes grad_scale and found_inf itself, after the step)."""
    handed = optimizer.__dict__.pop(_HANDED, None)
    if handed is not None and "found_inf" not in optimizer.__dict__:
        optimizer.__dict__.pop("grad_scale", None)


def _clear_stale_hand_over(optimizer) -> None:
    """A step that raised after the hand-over ran no post-step hook: the
    grad_scale it was handed, if still there as it was, is removed."""
    handed = optimizer.__dict__.pop(_HANDED, None)
    if handed is not None and optimizer.__dict__.get("grad_scale") is handed:
        if "found_inf" in optimizer.__dict__:
            optimizer.grad_scale = None  # (GradScaler after unscale_ hands None, and deletes it after the step)
        else:
            optimizer.__dict__.pop("grad_scale", None)


def _versions(grads) -> tuple:
    """A sign that the grads were not rewritten since: their version counters
    (a backward, zero_grad or any in-place op moves them)."""
    return tuple(g._version for g in grads)


def _current_grads(optimizer) -> list:
    return [p.grad for p in _params(optimizer) if p.grad is not None]


def _unchanged(optimizer, pending: _Pending) -> bool:
    """Are the optimizer's grads still the ones a deferred clip was computed
    for (the same tensors, not written since)?"""
    current = _current_grads(optimizer)
    refs = pending.grads
    same = len(refs) == len(current) and all(r() is g for r, g in zip(refs, current))
    return same and _versions(current) == pending.versions


def _same_iteration(optimizer, pending: _Pending) -> bool:
    """With a scaler: has it not been updated since the call?  (scaler.update()
    replaces every per-optimizer state of the scaler with a new one.)"""
    return pending.scaler is None or pending.scaler._per_optimizer_states.get(id(optimizer)) is pending.scaler_state


def _apply_pending(optimizer, scaler) -> None:
    """A clip deferred to a step that has not run yet, before another call: a
    second call sees the grads as torch's recipe leaves them after the
    first, so the first clip (with a scaler's call, the unscale too, unless
    this call brings that scaler, whose unscale_ error then follows) is
    written into them now.  If the grads were replaced or rewritten since (a
    new backward), or the scaler updated, the deferred clip is dropped with
    its step."""
    _clear_stale_hand_over(optimizer)
    pending = optimizer.__dict__.get(_PENDING)
    if pending is None:
        return
    same_iteration = _same_iteration(optimizer, pending)
    if pending.scaler is not None and same_iteration and scaler is pending.scaler:
        return  # (its unscale_ error comes next, nothing touched; the first call's hand-over stays for the step)
    optimizer.__dict__.pop(_PENDING, None)
    if not same_iteration:
        return
    grads = _current_grads(optimizer)
    if not _unchanged(optimizer, pending):
        if pending.scaler is not None:  # rewritten grads: the clip is gone, the unscale is owed
            torch._foreach_mul_(grads, pending.inv_scale)
        return
    if pending.scaler is None:
        torch._foreach_mul_(grads, pending.coef)  # as clip_grads_with_norm_ multiplies
    else:  # unscale and clip at once, as unscale_clip_grad_norm_ does
        torch._foreach_mul_(grads, pending.inv_scale.double() * pending.coef.double())
