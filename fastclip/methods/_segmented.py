"""What the segmented methods share: reading grads from parameters, per-item
arguments (one max_norm per parameter or per group), picking a backend, and
running the three primitives (reduce per segment, coefficient, apply) on it.

A method's own file checks its arguments the way the function it mirrors
does, says how its grads fall into segments and which coefficient applies,
and calls run(); whatever no fused backend takes goes to the method's
plain-torch path instead, before anything is modified.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .. import _dispatch
from .._ext import cpu as _ext
from .._work import GradList, as_list, collect, promoted_dtype
from ..backends.base import Coefficient, FusedBackend, SegmentCall, SegmentOutputs

F64 = torch.float64


def grads_of(parameters) -> tuple[list, list, list]:
    """(parameters as a list, their non-None grads, the position of each grad's
    parameter); torch's AttributeError for something that is not a tensor."""
    params = as_list(parameters)
    grads, positions = [], []
    for i, p in enumerate(params):
        g = p.grad
        if g is not None:
            grads.append(g)
            positions.append(i)
    return params, grads, positions


class Gathered(NamedTuple):
    """The grads of a parameter list, read once: positions is None when every
    parameter has a grad (the i-th grad is the i-th parameter's); work is the
    GradList of the fast C++ gather (plain tensors on one device), else None
    with `why` saying what the fused backends cannot take."""

    params: list
    grads: list
    positions: list | None
    work: GradList | None
    why: str


def gather(parameters) -> Gathered:
    """grads_of(), in one C++ call where possible (host time is what a step on
    many small tensors costs): parameters, grads, positions, GradList."""
    params = as_list(parameters)
    grads, work, why = collect(params, True)
    if len(grads) == len(params):
        return Gathered(params, grads, None, work, why)
    positions = [i for i, p in enumerate(params) if p.grad is not None]
    return Gathered(params, grads, positions, work, why)


def norms_dtype(grads, work: GradList | None = None) -> torch.dtype:
    """What per-segment norms come back in: float64 if a grad is float64 (or
    complex128, whose norms torch gives in float64), else float32."""
    if work is not None:
        return F64 if F64 in work.dtypes else torch.float32
    return F64 if any(g.dtype in (F64, torch.complex128) for g in grads) else torch.float32


def per_item(value, count: int, what: str, items: str):
    """A number for every item, or one value per item: (float, None) or
    (None, 1-D float64 tensor or list of floats).  Clear errors otherwise."""
    if isinstance(value, numbers.Real) or (_is_ndarray(value) and value.ndim == 0):
        return float(value), None  # torch's float(max_norm): bools too
    if isinstance(value, (str, bytes)):  # and numeric strings
        try:
            return float(value), None
        except ValueError:
            raise ValueError(f"{what} must be a number, or a sequence or 1-D tensor of numbers, not {value!r}") from None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return None, value.reshape(1)
        if value.dim() != 1 or value.numel() != count:
            raise ValueError(
                f"{what} must be a number or hold one value per {items}: got a tensor of shape "
                f"{tuple(value.shape)} for {count} {items}s"
            )
        return None, value
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, or a sequence or 1-D tensor of numbers, not {value!r}") from None
    if len(values) != count:
        raise ValueError(f"{what} must be a number or hold one value per {items}: got {len(values)} for {count} {items}s")
    return None, values


def _is_ndarray(value) -> bool:
    """A numpy array (0-dim ones are numbers to torch's float(max_norm)), without importing numpy."""
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device` without waiting for it: a host tensor goes to a CUDA
    device through pinned memory with a non-blocking copy (a plain .to()
    from pageable host memory blocks the host until the copy is done)."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def values_for(single, many, positions, device) -> torch.Tensor:
    """The float64 tensor of the values per segment the kernels read, on
    `device`, without a host sync: one value, or those at `positions` (None:
    all of them)."""
    if single is not None:
        return torch.full((1,), single, dtype=F64, device=device)
    if isinstance(many, torch.Tensor) and many.shape[0] == 1:  # a 0-dim tensor: one value for all
        return to_device(many.to(F64), device)
    if positions is None or (isinstance(many, torch.Tensor) and list(positions) == list(range(len(many)))):
        if isinstance(many, torch.Tensor):
            return to_device(many.to(F64), device)
        positions = range(len(many))
    if isinstance(many, torch.Tensor):
        index = to_device(torch.as_tensor(positions, dtype=torch.long), many.device)
        return to_device(many.index_select(0, index).to(F64), device)
    return to_device(torch.tensor([many[i] for i in positions], dtype=F64), device)


def narrow_segments(dtypes) -> dict:
    """The segments whose norm torch computes in float16 or bfloat16 (those of
    one such grad, or of a group of such grads alone): that dtype -> their
    ids.  `dtypes`: per segment, the dtype of its grads (None: no grads).
    torch's error_if_nonfinite sees an fp16 norm above 65504 as inf, where
    fastclip's float32 norm is finite: the check rounds those norms first."""
    narrow: dict = {}
    for s, dtype in enumerate(dtypes):
        if dtype in (torch.float16, torch.bfloat16):
            narrow.setdefault(dtype, []).append(s)
    return narrow


def group_dtype(grads):
    """The dtype torch's norm of these grads comes back in (None: no grads)."""
    return promoted_dtype(g.dtype for g in grads) if grads else None


def any_nonfinite(norms: torch.Tensor, narrow: dict | None = None) -> bool:
    """Is a norm not finite, as torch would have it (`narrow`: the segments
    whose torch norm is float16 / bfloat16, rounded to that first)?  A host sync."""
    bad = ~torch.isfinite(norms).all()
    for dtype, ids in (narrow or {}).items():
        index = to_device(torch.tensor(ids, dtype=torch.long), norms.device)
        bad = bad | ~torch.isfinite(norms.index_select(0, index).to(dtype)).all()
    return bool(bad)


def plan(name: str, grads: list, gathered: Gathered | None = None) -> tuple[FusedBackend | None, GradList | None]:
    """(fused backend, GradList) for these grads, or (None, None): torch's path.
    `gathered`: their GradList is already made."""
    if name == "torch" or not grads:
        return None, None
    if gathered is not None:
        work, why = gathered.work, gathered.why
    else:
        _grads, work, why = collect(grads, False)
    fused = _dispatch.select(name, work, why)
    return (fused, work) if fused is not None else (None, None)


def overlapping(work: GradList) -> bool:
    """Do some grads share memory (the same grad twice, aliasing views)?"""
    return _ext.tensors_overlap(work.table)


def share_storage(tensors) -> bool:
    """Do two of `tensors` share a storage (torch's path: the same grad twice, views)?"""
    seen = set()
    for t in tensors:
        try:
            key = (t.device, t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # sparse and other grads without one storage
            continue
        if key in seen:
            return True
        seen.add(key)
    return False


def run(
    fused: FusedBackend,
    work: GradList,
    kind: int,
    num_segments: int,
    coefficient: Coefficient,
    *,
    first_segment=None,
    slice_len=None,
    weights=None,
    norms_dtype=None,
    counts=False,
    total_dtype=None,
    apply=True,
    nonfinite_error=None,
    narrow=None,
    across=None,
    table=None,
) -> SegmentOutputs:
    """The primitives over `work` (segments as in SegmentCall), results on its device.

    nonfinite_error: if set, the norms are checked before anything is written
    (a host sync, as torch's error_if_nonfinite has) and this RuntimeError is
    raised if one is not finite (narrow: see narrow_segments).  across(out): reduces out.powers (and the
    rest) over ranks between the reduction and the coefficient.  Grads that
    are views go to GPU backends as contiguous copies, written back.
    table: the call's table with its segments (and weights) made already
    (dense grads only), instead of from first_segment, slice_len, weights."""
    views = []
    if fused.needs_dense and work.strided_indices():
        dense = work.with_dense_copies()
        views = [(work.tensors[i], dense.tensors[i]) for i in work.strided_indices()]
        work = dense
    call = SegmentCall(work, num_segments, first_segment, slice_len, weights, _table=table)
    device = work.device
    out = SegmentOutputs(
        powers=torch.zeros(num_segments, dtype=F64, device=device),  # segments without elements: 0
        weight_powers=torch.zeros(num_segments, dtype=F64, device=device) if call.has_weights else None,
        counts=torch.zeros(2, dtype=torch.int64, device=device) if counts else None,
        norms=torch.zeros(num_segments, dtype=norms_dtype, device=device) if norms_dtype is not None else None,
        coefs=torch.ones(num_segments, dtype=F64, device=device) if coefficient.mode != "none" else None,
        total=torch.empty((), dtype=total_dtype, device=device) if total_dtype is not None else None,
    )
    if across is not None:
        fused.segment_reduce(call, kind, out)
        across(out)
        fused.segment_finish(call, kind, out, coefficient)
        deferred = True
    elif nonfinite_error is not None:
        fused.segments(call, kind, out, coefficient, apply=False)
        deferred = True
    else:
        fused.segments(call, kind, out, coefficient, apply=apply)
        deferred = False
    if nonfinite_error is not None and any_nonfinite(out.norms, narrow):
        raise RuntimeError(nonfinite_error)
    if apply and deferred:
        fused.segment_apply(call, out.coefs)
    if apply:
        for view, copy in views:
            view.copy_(copy)
    return out
