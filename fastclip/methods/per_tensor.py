"""clip_grad_norm_per_tensor_: every grad clipped by its own norm.

For each parameter with a grad, independently, what
`torch.nn.utils.clip_grad_norm_([p], max_norm, norm_type)` does (Keras'
`clipnorm`, TF's `clip_by_norm`, AutoClip's per-parameter mode), with
fastclip's accuracy: one segment per grad, one read of every grad for all
norms, one pass that scales only the grads whose coefficient is not 1.
"""

from __future__ import annotations

import torch

from .. import _dispatch, _distributed, _ops
from .._errors import check_writable, empty_inf_norm_message, nonfinite_message
from .._no_grad import no_grad
from ..backends import torch_ref
from ..backends.base import FUSED_NORM_KINDS, LINF, Coefficient
from . import _segmented as seg
from . import _sharded


@no_grad
def clip_grad_norm_per_tensor_(
    parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, *, backend=None, process_group=None
) -> torch.Tensor:
    """Clip each gradient by its own norm, in place.

    For each parameter with a grad: coefficient ``clamp(max_norm / (n_i + 1e-6),
    max=1)`` from its norm ``n_i``, as ``torch.nn.utils.clip_grad_norm_([p], ...)``.
    ``max_norm``: a number, or one value per parameter passed (a sequence or
    a 1-D tensor; those of parameters without a grad are not used).  Returns
    the 1-D tensor of the norms before clipping, one per grad, in order:
    float32, or float64 when a grad is float64.  ``error_if_nonfinite``: a
    non-finite norm raises torch's error before any grad is touched (a norm
    torch computes in float16 or bfloat16, that of such a grad, counts as
    torch has it: an fp16 norm above 65504 is inf).
    DTensor grads and ``process_group`` (grads that are this rank's shards):
    each grad's norm is its whole norm, reduced over the ranks.
    """
    if torch.compiler.is_compiling():
        return _traced(parameters, max_norm, norm_type, error_if_nonfinite, backend, process_group)
    return clip_gathered(seg.gather(parameters), max_norm, norm_type, error_if_nonfinite, backend, process_group)


def clip_gathered(
    gathered: seg.Gathered, max_norm, norm_type=2.0, error_if_nonfinite=False, backend=None, process_group=None
) -> torch.Tensor:
    """clip_grad_norm_per_tensor_ on grads already gathered (QuantileClip's step)."""
    name = _dispatch.resolve_name(backend)
    params, grads, positions = gathered.params, gathered.grads, gathered.positions
    norm_type = float(norm_type)  # torch's ValueError / TypeError for 'fro', None
    single, many = seg.per_item(max_norm, len(params), "max_norm", "parameter")
    dtype = seg.norms_dtype(grads, gathered.work)
    if process_group is not None or (gathered.work is None and _distributed.has_dtensor(grads)):
        return _sharded_path(grads, single, many, positions, norm_type, error_if_nonfinite, name, process_group)
    kind = FUSED_NORM_KINDS.get(norm_type)
    fused, work = seg.plan(name, grads, gathered) if kind is not None else (None, None)
    if fused is None or seg.overlapping(work):  # duplicates: torch's one-after-the-other semantics
        in_turn = seg.share_storage(grads)
        return _torch_path(grads, single, many, positions, norm_type, error_if_nonfinite, dtype, in_turn)
    if kind == LINF and work.has_empty():
        raise RuntimeError(empty_inf_norm_message(None))
    coefficient = Coefficient("clip_norm", seg.values_for(single, many, positions, work.device))
    out = seg.run(
        fused, work, kind, len(grads), coefficient, norms_dtype=dtype,
        nonfinite_error=nonfinite_message(norm_type) if error_if_nonfinite else None,
        narrow=seg.narrow_segments([g.dtype for g in grads]) if error_if_nonfinite else None,
    )  # fmt: skip
    return out.norms


def _sharded_path(grads, single, many, positions, norm_type, error_if_nonfinite, name, process_group):
    """Every grad's whole norm, its shards' powers reduced over the ranks (methods/_sharded.py)."""
    _sharded.check_norm_type(norm_type, grads, process_group)
    sharded = _sharded.Sharded(grads, None, process_group, agc=False)
    powers, _w, _c, failed = _sharded.reduced_powers(sharded, None, None, len(grads), norm_type, name)
    coefficient = Coefficient("clip_norm", seg.values_for(single, many, positions, powers.device))
    out = _sharded.finish_and_apply(
        sharded, name, None, None, len(grads), norm_type, powers, None, failed, coefficient, True,
        norms_dtype=seg.norms_dtype(grads), nonfinite_error=nonfinite_message(norm_type) if error_if_nonfinite else None,
        narrow=seg.narrow_segments([g.dtype for g in grads]) if error_if_nonfinite else None,
    )  # fmt: skip
    return out.norms


def _torch_path(grads, single, many, positions, norm_type, error_if_nonfinite, dtype, in_turn=False) -> torch.Tensor:
    """torch's clip_grad_norm_([p]) for each grad in turn, its errors raised
    before any grad is touched.  in_turn: grads share memory, so each norm is
    taken after the grads before it were clipped (a duplicate is clipped twice)."""
    if not grads:
        return torch.empty(0, dtype=dtype)
    norms = [torch_ref.get_total_norm([g], norm_type) for g in grads]
    if error_if_nonfinite and not all(bool(torch.isfinite(n)) for n in norms):
        raise RuntimeError(nonfinite_message(norm_type))
    check_writable(grads)
    device = grads[0].device
    result = torch.stack([n.to(device=device, dtype=dtype) for n in norms])  # (its errors too before any write)
    for i, g in enumerate(grads):
        if in_turn:
            norms[i] = torch_ref.get_total_norm([g], norm_type)
        n = norms[i]
        if single is not None:
            coef = torch.clamp(single / (n + 1e-6), max=1.0)
        else:  # the same rounding: reciprocal, then the max_norm in the norm's dtype
            m = many[0 if len(many) == 1 else i if positions is None else positions[i]]
            m = m.to(device=n.device, dtype=n.dtype) if isinstance(m, torch.Tensor) else m
            coef = torch.clamp((n + 1e-6).reciprocal() * m, max=1.0)
        torch_ref.scale_grads([g], coef)
    return torch.stack([n.to(device=device, dtype=dtype) for n in norms]) if in_turn else result


# ---------------------------------------------------------------- torch.compile


def _traced(parameters, max_norm, norm_type, error_if_nonfinite, backend, process_group):
    """Under torch.compile: the grads are read in traced code, the work is the generic op."""
    if process_group is not None:  # collectives: run eagerly (a graph break)
        return torch._dynamo.disable(clip_grad_norm_per_tensor_)(
            parameters, max_norm, norm_type, error_if_nonfinite, backend=backend, process_group=process_group
        )
    params, grads, positions = seg.grads_of(parameters)
    norm_type = float(norm_type)
    single, many = seg.per_item(max_norm, len(params), "max_norm", "parameter")
    if not _ops.plain(grads) or norm_type not in FUSED_NORM_KINDS:  # torch's path, traced
        return _torch_path(grads, single, many, positions, norm_type, error_if_nonfinite, seg.norms_dtype(grads))
    numbers = [norm_type, float(bool(error_if_nonfinite))]
    values = None
    if single is not None:
        numbers.append(single)
    elif isinstance(many, torch.Tensor) and many.shape[0] == 1:  # a 0-dim tensor: one value for all
        values = many.reshape(())
    elif isinstance(many, torch.Tensor):
        values = many.index_select(0, torch.tensor(positions, dtype=torch.long, device=many.device))
    else:
        numbers += [many[i] for i in positions]
    return _ops.method_("per_tensor", grads, numbers=numbers, values=values, backend=backend)


def _eager_op(grads, weights, numbers, ints, values, backend):
    norm_type, error_if_nonfinite = numbers[0], bool(numbers[1])
    max_norm = values if values is not None else numbers[2] if len(numbers) == 3 else numbers[2:]
    return [clip_grad_norm_per_tensor_(_ops.holders(grads), max_norm, norm_type, error_if_nonfinite, backend=backend)]


def _fake_op(grads, numbers, ints):
    if not grads:
        return [torch.empty(0, dtype=torch.float32)]
    return [grads[0].new_empty((len(grads),), dtype=seg.norms_dtype(grads))]


_ops.register("per_tensor", _eager_op, _fake_op)
