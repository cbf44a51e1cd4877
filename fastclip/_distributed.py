"""Total norms over grads sharded across ranks: DTensor grads (FSDP2
`fully_shard`, tensor parallel) and grads sharded by hand (`process_group=`).

Each rank computes the norm of its local shards with a fused backend,
without rounding it to the grads' dtype (float64, from fp32 accumulation for
fp16/bf16); ranks then combine p-th powers: SUM for finite p, MAX for the
inf-norm.  DTensor grads are grouped by (mesh, mesh dims they are sharded
on); each group's sum is all-reduced over those mesh dims only (a grad
replicated on a mesh dim is counted once).  Plain tensors given beside
DTensors are taken to be the same on every rank (not reduced).  With
`process_group`, the whole sum is then all-reduced over that group, and a
rank with no grads still joins the collective.

The total comes back as the user expects it: for DTensor grads a DTensor
already reduced (Replicate on the first grad's mesh), so `.item()` and
`.full_tensor()` both give the full norm; otherwise a plain tensor, equal on
every rank.
"""

from __future__ import annotations

import sys

import torch

from . import _dispatch
from ._errors import empty_inf_norm_message, nonfinite_message
from ._work import collect
from .backends import torch_ref
from .backends.base import FUSED_NORM_KINDS


def dtensor_class():
    """torch's DTensor class if torch.distributed.tensor has been imported (no
    DTensor can exist before), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def has_dtensor(tensors) -> bool:
    cls = dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage: writes reach the DTensor)."""
    cls = dtensor_class()
    if cls is not None and isinstance(t, cls):
        return t._local_tensor
    return t


def full_value(total: torch.Tensor) -> torch.Tensor:
    """A norm as a plain tensor with the full value: reduced first if it is a
    DTensor with a Partial placement (as torch < 2.13 returns them)."""
    cls = dtensor_class()
    if cls is not None and isinstance(total, cls):
        return total.full_tensor() if any(p.is_partial() for p in total.placements) else total._local_tensor
    return total


# ---------------------------------------------------------------- p-th powers


def _reduce_op(p: float):
    from torch.distributed import ReduceOp

    if p == float("inf"):
        return ReduceOp.MAX
    if p == float("-inf"):
        return ReduceOp.MIN
    return ReduceOp.SUM


def _to_power(norm: torch.Tensor, p: float) -> torch.Tensor:
    """What ranks and groups add up (or take the max / min of)."""
    return norm if p in (0.0, float("inf"), float("-inf")) else norm.pow(p)


def _from_power(power: torch.Tensor, p: float) -> torch.Tensor:
    return power if p in (0.0, float("inf"), float("-inf")) else power.pow(1.0 / p)


def _combine(a: torch.Tensor | None, b: torch.Tensor, p: float) -> torch.Tensor:
    if a is None:
        return b
    b = b.to(a.device)
    if p == float("inf"):
        return torch.maximum(a, b)  # NaN propagates, as in torch's norms
    if p == float("-inf"):
        return torch.minimum(a, b)
    return a + b


def _local_power(tensors: list, p: float, name: str, foreach) -> torch.Tensor | None:
    """The p-th power of the norm of `tensors` (plain tensors on this rank) as
    a float64 0-dim tensor on their (first) device, or None if there are none."""
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    power = None
    kind = FUSED_NORM_KINDS.get(p)
    for group in by_device.values():
        fused = None
        if kind is not None:
            _grads, work, why = collect(group, False)
            fused = _dispatch.select(name, work, why)
        if fused is not None:
            norm = fused.norm_wide(work, kind)
        else:  # other p, dtypes or layouts: torch's own norm of this group
            norm = torch_ref.get_total_norm(group, p, False, foreach).to(torch.float64)
        power = _combine(power, _to_power(norm, p), p)
    return power


def _identity(p: float, device) -> torch.Tensor:
    """What a rank with nothing to add contributes."""
    value = float("inf") if p == float("-inf") else 0.0
    return torch.full((), value, dtype=torch.float64, device=device)


def _collective_device(process_group) -> torch.device:
    from torch.distributed import distributed_c10d

    return torch.device(distributed_c10d._get_object_coll_device(process_group))


# ---------------------------------------------------------------- the total


def total_norm(tensors: list, norm_type, error_if_nonfinite: bool, foreach, name: str, process_group):
    """(the total as torch's get_total_norm returns it, reduced over the ranks;
    the float32 total, float64 for float64 grads, that the clip coefficient
    is computed from).  Every rank must call it with the same kinds of grads."""
    import torch.distributed as dist

    p = float(norm_type)  # torch's ValueError / TypeError for 'fro', None
    cls = dtensor_class()
    plain, groups, dtypes, mesh = [], {}, set(), None
    for t in tensors:
        dtypes.add(t.dtype)
        if cls is None or not isinstance(t, cls):
            plain.append(t)
            if p == float("inf") and t.numel() == 0 and process_group is None:
                raise RuntimeError(empty_inf_norm_message(foreach))
            continue
        if p == float("inf") and t.numel() == 0:  # the global size: a rank's shard may be empty
            raise RuntimeError(empty_inf_norm_message(foreach))
        mesh = t.device_mesh if mesh is None else mesh
        if any(pl.is_partial() for pl in t.placements):  # unreduced values: reduce them (for the norm only)
            from torch.distributed.tensor import Replicate

            t = t.redistribute(t.device_mesh, [Replicate() if pl.is_partial() else pl for pl in t.placements])
        shard_dims = tuple(i for i, pl in enumerate(t.placements) if pl.is_shard())
        groups.setdefault((t.device_mesh, shard_dims), []).append(t._local_tensor)

    power = _local_power(plain, p, name, foreach)
    for (group_mesh, shard_dims), local in groups.items():
        group_power = _local_power(local, p, name, foreach)
        for dim in shard_dims:  # same order on every rank: grads come in the same order
            dist.all_reduce(group_power, op=_reduce_op(p), group=group_mesh.get_group(dim))
        power = _combine(power, group_power, p)
    if process_group is not None:
        if power is None:
            power = _identity(p, _collective_device(process_group))
        dist.all_reduce(power, op=_reduce_op(p), group=process_group)
    if power is None:  # no tensors at all (only reached through clip_grads_with_norm_'s callers)
        return torch.tensor(0.0), torch.tensor(0.0)

    wide = _from_power(power, p)
    result_dtype = _promoted(dtypes) if dtypes else torch.get_default_dtype()
    total = wide.to(result_dtype)
    coef_total = wide.to(torch.float64 if result_dtype == torch.float64 else torch.float32)
    if error_if_nonfinite and not bool(torch.isfinite(total)):  # every rank sees the same total
        raise RuntimeError(nonfinite_message(p))
    if mesh is not None:
        from torch.distributed.tensor import Replicate

        total = cls.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return total, coef_total


def _promoted(dtypes) -> torch.dtype:
    result = None
    for d in dtypes:
        result = d if result is None else torch.promote_types(result, d)
    return result
