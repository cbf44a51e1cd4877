"""grad_stats: the gradient statistics training scripts log, in one read.

The total norm (as get_total_norm returns it), every grad's norm (Lightning's
`grad_norm`, apex's per_tensor), and the counts of non-finite values and of
zeros (Megatron's `count_zeros`, optax's `num_not_finite`): one segment per
grad, one pass over the grads, nothing written, no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _dispatch, _distributed, _ops
from .._errors import empty_inf_norm_message
from .._no_grad import no_grad
from .._work import promoted_dtype
from ..backends import torch_ref
from ..backends.base import FUSED_NORM_KINDS, LINF, Coefficient
from . import _segmented as seg
from . import _sharded


class GradStats(NamedTuple):
    """What grad_stats returns: device tensors, read whenever convenient."""

    total_norm: torch.Tensor  # 0-dim, as get_total_norm returns it (the grads' promoted dtype)
    per_tensor_norms: torch.Tensor  # 1-D, one per grad: float32, or float64 when a grad is float64
    num_nonfinite: torch.Tensor  # 0-dim int64: elements that are inf or NaN
    num_zeros: torch.Tensor  # 0-dim int64: elements that are zero (either sign)


@no_grad
def grad_stats(parameters, norm_type=2.0, *, backend=None, process_group=None) -> GradStats:
    """Statistics of the gradients of ``parameters``, in one read, nothing written.

    ``norm_type``: the norms' order (1, 2 and inf fused; others by torch).
    DTensor grads and ``process_group``: every statistic of the whole grads,
    reduced over the ranks (the counts summed, each shard counted once).
    """
    if torch.compiler.is_compiling():
        return _traced(parameters, norm_type, backend, process_group)
    name = _dispatch.resolve_name(backend)
    gathered = seg.gather(parameters)  # (one C++ call: host time is what many small grads cost)
    grads = gathered.grads
    norm_type = float(norm_type)
    if process_group is not None or (gathered.work is None and _distributed.has_dtensor(grads)):
        _sharded.check_norm_type(norm_type, grads, process_group)
        sharded = _sharded.Sharded(grads, None, process_group, agc=False)
        S = len(grads)
        powers, _w, counts, failed = _sharded.reduced_powers(sharded, None, None, S, norm_type, name, counts=True)
        dtypes = {g.dtype for g in sharded.local}
        out = _sharded.finish_and_apply(
            sharded, name, None, None, S, norm_type, powers, None, failed, Coefficient("none"), False,
            norms_dtype=seg.norms_dtype(grads), total_dtype=promoted_dtype(dtypes) if dtypes else torch.float32,
        )  # fmt: skip
        return GradStats(out.total, out.norms, counts[0].to(out.total.device), counts[1].to(out.total.device))
    kind = FUSED_NORM_KINDS.get(norm_type)
    fused, work = seg.plan(name, grads, gathered) if kind is not None else (None, None)
    if fused is None:
        return _torch_path(grads, norm_type)
    if kind == LINF and work.has_empty():
        raise RuntimeError(empty_inf_norm_message(None))
    out = seg.run(
        fused, work, kind, len(grads), Coefficient("none"), norms_dtype=seg.norms_dtype(grads, work), counts=True,
        total_dtype=promoted_dtype(work.dtypes), apply=False,
    )  # fmt: skip
    return GradStats(out.total, out.norms, out.counts[0], out.counts[1])


def _torch_path(grads, norm_type) -> GradStats:
    total = torch_ref.get_total_norm(grads, norm_type)
    dtype = seg.norms_dtype(grads)
    if not grads:
        zero = torch.zeros((), dtype=torch.int64)
        return GradStats(total, torch.empty(0, dtype=dtype), zero, zero.clone())
    device = grads[0].device
    # each grad's own norm, as get_total_norm takes it before the norm of norms (p=0: its nonzero elements)
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type).to(device=device, dtype=dtype) for g in grads])
    nonfinite = sum((~torch.isfinite(g)).sum().to(device) for g in grads)
    zeros = sum((g == 0).sum().to(device) for g in grads)
    return GradStats(total, norms, nonfinite, zeros)


# ---------------------------------------------------------------- torch.compile


def _traced(parameters, norm_type, backend, process_group) -> GradStats:
    """Under torch.compile: the grads are read in traced code, the work is the generic (reading) op."""
    if process_group is not None:  # collectives: run eagerly (a graph break)
        return torch._dynamo.disable(grad_stats)(parameters, norm_type, backend=backend, process_group=process_group)
    _params, grads, _positions = seg.grads_of(parameters)
    norm_type = float(norm_type)
    if not _ops.plain(grads) or norm_type not in FUSED_NORM_KINDS:
        return _torch_path(grads, norm_type)
    return GradStats(*_ops.method("stats", grads, numbers=[norm_type], backend=backend))


def _eager_op(grads, weights, numbers, ints, values, backend):
    stats = grad_stats(_ops.holders(grads), numbers[0], backend=backend)
    # (the counts are views of one tensor: an op's results must not alias each other)
    return [stats.total_norm, stats.per_tensor_norms, stats.num_nonfinite.clone(), stats.num_zeros.clone()]


def _fake_op(grads, numbers, ints):
    if not grads:
        return [torch.empty((), dtype=torch.get_default_dtype()), torch.empty(0, dtype=torch.float32),
                torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.int64)]  # fmt: skip
    g = grads[0]
    return [
        g.new_empty((), dtype=promoted_dtype(t.dtype for t in grads)),
        g.new_empty((len(grads),), dtype=seg.norms_dtype(grads)),
        g.new_empty((), dtype=torch.int64),
        g.new_empty((), dtype=torch.int64),
    ]


_ops.register("stats", _eager_op, _fake_op)
