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

from . import _dispatch, _distributed, _ops, _work
from ._errors import (
    check_clamp_like_torch,
    check_clip_value,
    check_writable,
    empty_inf_norm_message,
    nonfinite_message,
    unwritable,
)
from ._no_grad import no_grad
from ._work import as_list, collect
from .backends import torch_ref
from .backends.base import FUSED_NORM_KINDS, LINF


def _gather(name: str, items: list, from_params: bool, sign_matters: bool = False):
    """collect()'s (grads, GradList or None, why not), or nothing to gather for backend="torch"."""
    if name == "torch":
        return None, None, "backend='torch'"
    return collect(items, from_params, sign_matters)  # torch's AttributeError for a non-parameter


def _norm_plan(name: str, grads, work, why: str, norm_type):
    """(fused backend, GradList, norm kind) if a fused backend takes this
    norm, else None: torch does the call."""
    if name == "torch":
        return None
    kind = FUSED_NORM_KINDS.get(float(norm_type))  # torch's ValueError / TypeError for 'fro', None
    if not grads or kind is None:  # other p (0, -inf, 0.5, -2, nan): torch's semantics exactly
        return None
    fused = _dispatch.select(name, work, why)
    return None if fused is None else (fused, work, kind)


def _elementwise_plan(name: str, grads, work, why: str):
    """(fused backend, GradList) for scaling or clamping the grads, or None."""
    if name == "torch" or not grads:
        return None
    fused = _dispatch.select(name, work, why)
    return None if fused is None else (fused, work)


def _grads_of(grads, parameters) -> list:
    """The grads _gather read, or (backend="torch": it read none) the parameters' grads."""
    return grads if grads is not None else [p.grad for p in parameters if p.grad is not None]


def _has_dtensor(grads, work) -> bool:
    """DTensor grads (FSDP2, tensor parallel)?  Only asked when the fast
    gather declined the list (a DTensor is not a plain tensor)."""
    return work is None and bool(grads) and _distributed.has_dtensor(grads)


def _check_no_empty_for_inf(grads, kind: int, foreach) -> None:
    if kind == LINF and grads.has_empty():
        raise RuntimeError(empty_inf_norm_message(foreach))


@no_grad
def clip_grad_norm_(
    parameters,
    max_norm,
    norm_type=2.0,
    error_if_nonfinite=False,
    foreach=None,
    *,
    backend=None,
    process_group=None,
) -> torch.Tensor:
    """Clip the gradient norm of an iterable of parameters, in place.

    Same arguments and result as ``torch.nn.utils.clip_grad_norm_``: returns
    the total norm of all gradients (viewed as one vector) before clipping.
    ``backend`` picks the implementation ("auto", "cpu", "triton", "cuda",
    "torch"; default ``$FASTCLIP_BACKEND`` or "auto").  Fused backends
    accumulate fp16/bf16 in float32 and clip with that total (see README).

    DTensor grads (FSDP2, tensor parallel) are reduced over their mesh and
    the norm is returned as a replicated DTensor (with backend="torch", and
    under torch.compile, torch's own functions take DTensor grads).
    ``process_group``: the grads are this rank's shards of a whole that is
    spread over the group; the norm is all-reduced over it (every rank of
    the group must call; under torch.compile this runs eagerly).
    """
    if torch.compiler.is_compiling():
        if process_group is not None:  # collectives: run eagerly (a graph break)
            return torch._dynamo.disable(clip_grad_norm_)(  # dynamo is loaded: we are being compiled
                parameters,
                max_norm,
                norm_type,
                error_if_nonfinite,
                foreach,
                backend=backend,
                process_group=process_group,
            )
        return _ops.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, backend)
    name = _dispatch.resolve_name(backend)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn(  # (stacklevel: past no_grad's wrapper, at the caller)
                "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3
            )
    grads, work, why = _gather(name, parameters, True)
    if process_group is not None or _has_dtensor(grads, work):
        grads = grads if grads is not None else [p.grad for p in parameters if p.grad is not None]
        return clip_sharded(grads, max_norm, norm_type, error_if_nonfinite, foreach, name, process_group, work).total
    plan = _norm_plan(name, grads, work, why, norm_type)
    if plan is not None:
        fused, work, kind = plan
        _check_no_empty_for_inf(work, kind, foreach)
        try:
            max_norm_value = float(max_norm)
        except (TypeError, ValueError):
            plan = None  # torch raises it, after any error of its own norm step
    if plan is None:
        grads = _grads_of(grads, parameters)
        if unwritable(grads):  # torch raises on reaching that grad: here before any is written
            torch_ref.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)  # (its errors come first)
            float(max_norm)
            check_writable(grads)
        return torch_ref.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    if work.scales_unlike_torch(work.result_dtype):  # our norm, torch's multiply
        total = fused.norm(work, kind)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(nonfinite_message(float(norm_type)))
        check_writable(grads)
        torch_ref.clip_grads_with_norm_(parameters, max_norm_value, total, foreach)
        return total
    total, aborted = fused.clip_norm(work, kind, max_norm_value, error_if_nonfinite)
    if aborted:
        raise RuntimeError(nonfinite_message(float(norm_type)))
    return total


def clip_sharded(grads, max_norm, norm_type, error_if_nonfinite, foreach, name, process_group, work=None):
    """clip_grad_norm_ of sharded grads; returns the ShardedTotal (_distributed.total_norm)."""
    sharded = _distributed.total_norm(grads, norm_type, error_if_nonfinite, foreach, name, process_group, work)
    if grads:
        max_norm = float(max_norm)
        coef = sharded.coefficient(max_norm)
        coef = torch.where(sharded.failed_elsewhere, torch.ones_like(coef), coef)  # that rank raised: leave the grads
        _scale_grads(grads, coef, foreach, name, work, sharded.local_work)
    return sharded


@no_grad
def get_total_norm(
    tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend=None, process_group=None
) -> torch.Tensor:
    """The norm of all `tensors` viewed as one vector (``torch.nn.utils.get_total_norm``).

    DTensors and ``process_group``: as in :func:`clip_grad_norm_`."""
    if torch.compiler.is_compiling():
        if process_group is not None:  # collectives: run eagerly (a graph break)
            return torch._dynamo.disable(get_total_norm)(
                tensors, norm_type, error_if_nonfinite, foreach, backend=backend, process_group=process_group
            )
        return _ops.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach, backend)
    name = _dispatch.resolve_name(backend)
    tensors = as_list(tensors)
    grads, work, why = _gather(name, tensors, False)
    if process_group is not None or _has_dtensor(grads, work):
        return _distributed.total_norm(tensors, norm_type, error_if_nonfinite, foreach, name, process_group, work)[0]
    plan = _norm_plan(name, grads, work, why, norm_type)
    if plan is None:
        return torch_ref.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    fused, grads, kind = plan
    _check_no_empty_for_inf(grads, kind, foreach)
    total = fused.norm(grads, kind)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(nonfinite_message(float(norm_type)))
    return total


@no_grad
def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None, *, backend=None) -> None:
    """Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)``, in place
    (``torch.nn.utils.clip_grads_with_norm_``); skipped when that is exactly 1.
    DTensor grads are scaled shard by shard (a DTensor total is used reduced)."""
    if torch.compiler.is_compiling():
        return _ops.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach, backend)
    name = _dispatch.resolve_name(backend)
    parameters = as_list(parameters)
    grads, work, why = _gather(name, parameters, True)
    if _has_dtensor(grads, work):
        max_norm = float(max_norm)
        total = _distributed.full_value(total_norm)
        _scale_grads(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0), foreach, name)
        return None
    plan = _elementwise_plan(name, grads, work, why)
    if plan is None or plan[1].scales_unlike_torch(getattr(total_norm, "dtype", None)):
        grads = _grads_of(grads, parameters)
        if unwritable(grads):  # torch raises on reaching that grad: here before any is written
            # (torch's errors for its arguments come first: its own code on copies, which it can write)
            torch_ref.clip_grads_with_norm_(_ops.holders([g.clone() for g in grads]), max_norm, total_norm, foreach)
            check_writable(grads)
        return torch_ref.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    fused, work = plan
    max_norm = float(max_norm)
    # torch's own expression: same rounding, same TypeError for a float total.
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if not fused.scale(work, coef):
        torch_ref.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    return None


def _scale_grads(grads: list, coef: torch.Tensor, foreach, name: str, work=None, local_work=None) -> None:
    """grads *= coef (their DTensor shards, if they are DTensors): fused per
    device where a backend takes them, else torch's foreach multiply.
    `work`: the grads' GradList if the caller has one (plain grads);
    `local_work`: that of their local shards, in the same order."""
    if work is not None:
        local, why = grads, ""
    else:
        local = list(map(_distributed.local_tensor, grads))
        if local_work is not None:
            work, why = local_work, ""
        else:
            _local, work, why = _gather(name, local, False)
    if work is not None:  # plain tensors on one device: one call
        groups = [(local, work, why)]
    else:
        by_device: dict = {}
        for t in local:
            by_device.setdefault(t.device, []).append(t)
        groups = [(group, *_gather(name, group, False)[1:]) for group in by_device.values()]
    # DTensors: the wrapper has a version counter of its own.  It follows its
    # shard's: bumped when the shard was written (no bump when the fused
    # scale pass was skipped for a coefficient of exactly 1, as for plain
    # grads).  A group's tensors are written all or none.
    wrapped = local is not grads
    written = []
    for group, group_work, group_why in groups:
        version = _version_of(group[0]) if wrapped else None
        plan = _elementwise_plan(name, group, group_work, group_why)
        fused_ok = plan is not None and not plan[1].scales_unlike_torch(coef.dtype)
        if not fused_ok or not plan[0].scale(plan[1], coef.to(group[0].device)):
            torch_ref.scale_grads(group, coef, foreach)
        if version is not None and _version_of(group[0]) != version:
            written.append(group)
    if written:
        shards = {id(t) for group in written for t in group}
        _work.increment_version([g for g, t in zip(grads, local) if g is not t and id(t) in shards])


def _version_of(t: torch.Tensor):
    """t's autograd version counter, or None for an inference tensor (it has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


@no_grad
def clip_grad_value_(parameters, clip_value, foreach=None, *, backend=None) -> None:
    """Clamp every gradient to [-clip_value, clip_value], in place, in one pass
    that writes only what changes (``torch.nn.utils.clip_grad_value_``).
    DTensor grads are clamped shard by shard."""
    if torch.compiler.is_compiling():
        return _ops.clip_grad_value_(parameters, clip_value, foreach, backend)
    name = _dispatch.resolve_name(backend)
    parameters = as_list(parameters)
    clip_value_f = float(clip_value)
    sign_matters = clip_value_f < 0
    grads, work, why = _gather(name, parameters, True, sign_matters)
    dtensors = grads if _has_dtensor(grads, work) and not _distributed.has_partial(grads) else []
    if dtensors:  # clamp their shards (unreduced Partial grads go to torch: clamping is not linear)
        grads, work, why = _gather(name, [_distributed.local_tensor(g) for g in grads], False, sign_matters)
    plan = _elementwise_plan(name, grads, work, why)
    if plan is None:
        grads = _grads_of(grads, parameters)
        if unwritable(grads):  # torch raises on reaching that grad: here before any is written
            check_clamp_like_torch(grads, clip_value_f)
        if any(g.layout != torch.strided for g in grads):  # torch's error on reaching a sparse grad, say,
            torch_ref.clip_grad_value_(_ops.holders([g.clone() for g in grads]), clip_value, foreach)  # on copies
        return torch_ref.clip_grad_value_(parameters, clip_value, foreach)
    fused, work = plan
    check_clip_value(clip_value_f, work.tensors, work.dtypes)  # before any write, unlike torch
    fused.clamp(work, clip_value_f)
    if dtensors:
        _work.increment_version(dtensors)
    return None


@deprecated(
    "`fastclip.clip_grad_norm` is now deprecated in favor of `fastclip.clip_grad_norm_`.",
    category=FutureWarning,
)
def clip_grad_norm(
    parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend=None, process_group=None
) -> torch.Tensor:
    """Deprecated alias of :func:`clip_grad_norm_` (as in torch)."""
    return clip_grad_norm_(
        parameters, max_norm, norm_type, error_if_nonfinite, foreach, backend=backend, process_group=process_group
    )


for _name, _fn in (
    ("clip_grad_norm_", clip_grad_norm_),
    ("get_total_norm", get_total_norm),
    ("clip_grads_with_norm_", clip_grads_with_norm_),
    ("clip_grad_value_", clip_grad_value_),
):
    _ops.register(_name, _fn)  # the eager code behind torch.ops.fastclip.<name>
