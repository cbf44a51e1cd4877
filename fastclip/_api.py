"""The public functions: torch.nn.utils' signatures, torch's argument handling,
then a fused backend (or torch itself) does the work.

Every function follows torch's steps in torch's order, so the same inputs
raise the same errors.  Whenever the fused path cannot give torch's exact
behaviour (a grad type, layout or norm type it does not fuse, an unusual
argument) the whole call is handed to torch.nn.utils before anything is
modified.
"""

from __future__ import annotations

import types
import warnings

import torch
from typing_extensions import deprecated

from . import _dispatch
from ._errors import check_clip_value, empty_inf_norm_message, nonfinite_message
from ._work import collect
from .backends import torch_ref
from .backends.base import FUSED_NORM_KINDS, LINF


def _as_list(parameters) -> list:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _norm_plan(name: str, items: list, from_params: bool, norm_type):
    """(fused backend, GradList, norm kind) if a fused backend takes this norm,
    else None: torch does the call."""
    if name == "torch":
        return None
    grads, work, why = collect(items, from_params)  # torch's AttributeError first
    kind = FUSED_NORM_KINDS.get(float(norm_type))  # then torch's ValueError / TypeError for 'fro', None
    if not grads or kind is None:  # other p (0, -inf, 0.5, -2, nan): torch's semantics exactly
        return None
    fused = _dispatch.select(name, work, why)
    return None if fused is None else (fused, work, kind)


def _elementwise_plan(name: str, parameters: list, sign_matters: bool = False):
    """(fused backend, GradList) for scaling or clamping the grads, or None."""
    if name == "torch":
        return None
    grads, work, why = collect(parameters, True, sign_matters)
    if not grads:
        return None
    fused = _dispatch.select(name, work, why)
    return None if fused is None else (fused, work)


def _check_no_empty_for_inf(grads, kind: int, foreach) -> None:
    if kind == LINF and grads.has_empty():
        raise RuntimeError(empty_inf_norm_message(foreach))


def clip_grad_norm_(
    parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend=None
) -> torch.Tensor:
    """Clip the gradient norm of an iterable of parameters, in place.

    Same arguments and result as ``torch.nn.utils.clip_grad_norm_``: returns
    the total norm of all gradients (viewed as one vector) before clipping.
    ``backend`` picks the implementation ("auto", "cpu", "triton", "cuda",
    "torch"; default ``$FASTCLIP_BACKEND`` or "auto").  Fused backends
    accumulate fp16/bf16 in float32 and clip with that total (see README).
    """
    name = _dispatch.resolve_name(backend)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    plan = _norm_plan(name, parameters, True, norm_type)
    if plan is not None:
        fused, grads, kind = plan
        _check_no_empty_for_inf(grads, kind, foreach)
        try:
            max_norm_value = float(max_norm)
        except (TypeError, ValueError):
            plan = None  # torch raises it, after any error of its own norm step
    if plan is None:
        return torch_ref.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    total, aborted = fused.clip_norm(grads, kind, max_norm_value, error_if_nonfinite)
    if aborted:
        raise RuntimeError(nonfinite_message(float(norm_type)))
    return total


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend=None) -> torch.Tensor:
    """The norm of all `tensors` viewed as one vector (``torch.nn.utils.get_total_norm``)."""
    name = _dispatch.resolve_name(backend)
    tensors = _as_list(tensors)
    plan = _norm_plan(name, tensors, False, norm_type)
    if plan is None:
        return torch_ref.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    fused, grads, kind = plan
    _check_no_empty_for_inf(grads, kind, foreach)
    total = fused.norm(grads, kind)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(nonfinite_message(float(norm_type)))
    return total


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None, *, backend=None) -> None:
    """Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)``, in place
    (``torch.nn.utils.clip_grads_with_norm_``); skipped when that is exactly 1."""
    name = _dispatch.resolve_name(backend)
    parameters = _as_list(parameters)
    plan = _elementwise_plan(name, parameters)
    if plan is None:
        return torch_ref.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    fused, grads = plan
    max_norm = float(max_norm)
    # torch's own expression: same rounding, same TypeError for a float total.
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if not fused.scale(grads, coef):
        torch_ref.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    return None


def clip_grad_value_(parameters, clip_value, foreach=None, *, backend=None) -> None:
    """Clamp every gradient to [-clip_value, clip_value], in place, in one pass
    that writes only what changes (``torch.nn.utils.clip_grad_value_``)."""
    name = _dispatch.resolve_name(backend)
    parameters = _as_list(parameters)
    clip_value_f = float(clip_value)
    plan = _elementwise_plan(name, parameters, sign_matters=clip_value_f < 0)
    if plan is None:
        return torch_ref.clip_grad_value_(parameters, clip_value, foreach)
    fused, grads = plan
    check_clip_value(clip_value_f, grads.tensors, grads.dtypes)  # before any write, unlike torch
    fused.clamp(grads, clip_value_f)
    return None


@deprecated(
    "`fastclip.clip_grad_norm` is now deprecated in favor of `fastclip.clip_grad_norm_`.",
    category=FutureWarning,
)
def clip_grad_norm(
    parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend=None
) -> torch.Tensor:
    """Deprecated alias of :func:`clip_grad_norm_` (as in torch)."""
    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, backend=backend)
