"""Total norms over grads sharded across ranks: DTensor grads (FSDP2
`fully_shard`, tensor parallel) and grads sharded by hand (`process_group=`).

Each rank computes the norm of its local shards with a fused backend,
without rounding it to the grads' dtype (float64, from fp32 accumulation for
fp16/bf16); ranks then combine p-th powers: SUM for finite p, MAX for the
inf-norm.  DTensor grads are grouped by (mesh, mesh dims they are sharded
on); each group's sum is all-reduced over those mesh dims only (a grad
replicated on a mesh dim is counted once).  Plain tensors beside DTensors
are refused, as torch does: nothing says they are the same on every rank.
With `process_group`, the whole sum is then all-reduced over that group, and
a rank with no grads still joins the collective.

The total comes back as the user expects it: for DTensor grads a DTensor
already reduced (Replicate on the first grad's mesh), so `.item()` and
`.full_tensor()` both give the full norm; otherwise a plain tensor, equal on
every rank.
"""

from __future__ import annotations

import sys
from operator import attrgetter
from typing import NamedTuple

import torch

from . import _dispatch
from ._errors import nonfinite_message
from ._work import collect, promoted_dtype
from .backends import torch_ref
from .backends.base import FUSED_NORM_KINDS

_dtype_of = attrgetter("dtype")


def dtensor_class():
    """torch's DTensor class if torch.distributed.tensor has been imported (no
    DTensor can exist before), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def has_dtensor(tensors) -> bool:
    cls = dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def _is_partial(placements) -> bool:
    """Unreduced values on some mesh dim?"""
    return any(pl.is_partial() for pl in placements)


def has_partial(tensors) -> bool:
    """Any DTensor with a Partial (unreduced) placement among `tensors`?"""
    cls = dtensor_class()
    return cls is not None and any(isinstance(t, cls) and _is_partial(t.placements) for t in tensors)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage: writes reach the
    DTensor); a plain tensor itself."""
    return getattr(t, "_local_tensor", t)


def full_value(total: torch.Tensor) -> torch.Tensor:
    """A norm as a plain tensor with the full value: reduced first if it is a
    DTensor with a Partial placement (as torch < 2.13 returns them)."""
    cls = dtensor_class()
    if cls is not None and isinstance(total, cls):
        return total.full_tensor() if _is_partial(total.placements) else total._local_tensor
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
    return norm if p in (float("inf"), float("-inf")) else norm.pow(p)


def _from_power(power: torch.Tensor, p: float) -> torch.Tensor:
    return power if p in (float("inf"), float("-inf")) else power.pow(1.0 / p)


def _combine(a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    b = b.to(a.device)
    if p == float("inf"):
        return torch.maximum(a, b)  # NaN propagates, as in torch's norms
    if p == float("-inf"):
        return torch.minimum(a, b)
    return a + b


def _local_power(tensors: list, p: float, name: str, foreach, device, work=None):
    """(the p-th power of the norm of `tensors` (plain tensors on this rank) as
    a float64 0-dim tensor on their (first) device, else on `device`; their
    GradList if one fused call took them all, else None).  Empty tensors add
    nothing (a rank's shard may be empty; torch's norms would raise for the
    inf-norm on that rank alone)."""
    device = tensors[0].device if tensors else device
    kind = FUSED_NORM_KINDS.get(p)
    if kind is not None and tensors:  # the common case: one device, plain tensors, the kernels' dtypes
        why = ""
        if work is None:
            _grads, work, why = collect(tensors, False)
        fused = _dispatch.select(name, work, why) if work is not None else None
        if fused is not None:
            return _to_power(fused.norm_wide(work, kind), p), work  # the kernels skip empty tensors
    by_device: dict = {}
    for t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(t)
    power = _identity(p, device)
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
    return power, None


def _identity(p: float, device) -> torch.Tensor:
    """What a rank with nothing to add contributes."""
    value = float("inf") if p == float("-inf") else 0.0
    return torch.full((), value, dtype=torch.float64, device=device)


# ---------------------------------------------------------------- what ranks exchange

# One small float64 vector per reduction, so each all-reduce is one collective:
# [p-th power (NaN replaced by the identity), NaN flag, failure flag, one flag
# per result dtype].  Flags are 0/1; MIN reduces their negation.
_RESULT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAN, _FAILED, _DTYPES = 1, 2, 3


def _state(power: torch.Tensor, failed: bool, dtypes, p: float) -> torch.Tensor:
    """The vector a rank contributes (built on the device without a host copy)."""
    state = torch.zeros(_DTYPES + len(_RESULT_DTYPES), dtype=torch.float64, device=power.device)
    is_nan = torch.isnan(power)
    state[0] = torch.where(is_nan, _identity(p, power.device), power)
    state[_NAN] = is_nan.double()
    if failed:
        state[_FAILED] = 1.0
    for i, dtype in enumerate(_RESULT_DTYPES):
        if dtype in dtypes:
            state[_DTYPES + i] = 1.0
    return state


def _combine_states(a: torch.Tensor | None, b: torch.Tensor, p: float) -> torch.Tensor:
    if a is None:
        return b
    b = b.to(a.device)
    return torch.cat([_combine(a[:1], b[:1], p), torch.maximum(a[1:], b[1:])])


def _all_reduce(state: torch.Tensor, p: float, group, device) -> torch.Tensor:
    """All-reduce a state over `group`, on `device` (the same on every rank).
    A NaN on any rank gives NaN on every rank: sums would carry it, but
    gloo's MAX and MIN may drop it, hence the flag."""
    import torch.distributed as dist

    home = state.device
    state = state.to(device)
    sign = -1.0 if p == float("-inf") else 1.0  # MIN: reduce the negated flags
    if sign < 0:
        state[1:] *= -1
    dist.all_reduce(state, op=_reduce_op(p), group=group)
    if sign < 0:
        state[1:] *= -1
    return state.to(home)


def _value(state: torch.Tensor) -> torch.Tensor:
    return torch.where(state[_NAN] > 0, torch.full_like(state[0], float("nan")), state[0])


def _collective_device(process_group) -> torch.device:
    """Where every rank of `process_group` all-reduces (all alike, also a rank
    with no grads): the current CUDA device if the group maps CUDA to a GPU
    backend (NCCL), else the CPU."""
    from torch.distributed import distributed_c10d

    try:
        config = distributed_c10d.get_backend_config(process_group)  # e.g. "cuda:nccl,cpu:gloo"
        backends = dict(item.split(":", 1) for item in config.split(",") if ":" in item)
    except (AttributeError, RuntimeError, ValueError):
        return torch.device(distributed_c10d._get_object_coll_device(process_group))
    if torch.cuda.is_available() and backends.get("cuda", "gloo") != "gloo":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_if_torch_would(tensors: list, p: float, foreach) -> None:
    """torch's error for a norm it cannot take (the inf-norms of an empty
    tensor), for tensors whose (global) size is the same on every rank, so
    that every rank raises alike, before any collective."""
    if p in (float("inf"), float("-inf")) and any(t.numel() == 0 for t in tensors):
        torch_ref.get_total_norm([torch.empty(0)], p, False, foreach)  # raises torch's own text


P0_MESSAGE = (
    "fastclip: norm_type=0 with sharded grads: torch's 0-norm of a list counts the tensors that hold a "
    "nonzero, which the shards of a tensor on several ranks cannot tell"
)
MIXED_MESSAGE = (
    "fastclip: the grads mix DTensors and plain tensors; a plain grad is not known to be the same on "
    "every rank (torch raises on such a mix too).  Make it a DTensor (e.g. distribute_tensor(g, mesh, "
    "[Replicate()])), or take the norms of the two sets apart and combine them"
)


# ---------------------------------------------------------------- the total


def _split_by_spec(tensors: list, cls) -> tuple[list, dict]:
    """(plain tensors, {(mesh id, placements): (mesh, placements, DTensors)}).
    A DTensor with the same mesh and placements as the one before it (the
    usual case) skips the dict: hashing placements runs Python code."""
    plain, by_spec = [], {}
    last_mesh = last_placements = members = None
    for t in tensors:
        if cls is None or not isinstance(t, cls):
            plain.append(t)
            continue
        mesh, placements = t.device_mesh, t.placements
        if mesh is not last_mesh or (placements is not last_placements and placements != last_placements):
            entry = by_spec.get((id(mesh), placements))
            if entry is None:
                entry = by_spec[id(mesh), placements] = (mesh, placements, [])
            last_mesh, last_placements, members = mesh, placements, entry[2]
        members.append(t)
    return plain, by_spec


class ShardedTotal(NamedTuple):
    total: torch.Tensor  # as torch's get_total_norm returns it, reduced over the ranks
    wide: torch.Tensor  # float64 0-dim: the reduced norm before its rounding
    present: torch.Tensor  # bool, one per _RESULT_DTYPES: does some rank hold grads of that dtype
    # the float64 flag of `present` is this rank's own (DTensors: their dtypes are the same on every
    # rank; error_if_nonfinite: all ranks' were read); else it is chosen on the device
    everyone_known: bool
    local_float64: bool  # this rank holds float64 grads (or, everyone_known, some rank does)
    failed_elsewhere: torch.Tensor  # 0-dim bool: another rank's local norm failed, leave the grads alone
    local_work: object  # GradList of this rank's local tensors, in the order of `tensors`, or None

    def coefficient(self, max_norm: float, for_this_rank: bool = True) -> torch.Tensor:
        """torch's clamp(max_norm / (total + 1e-6), max=1) for the total as all
        ranks' grads promote, so the same on every rank: float64 arithmetic if
        some rank holds float64 grads, else float32 (chosen on the device where
        this rank cannot know).  for_this_rank: in the dtype this rank
        multiplies its grads by (float32 unless it holds float64 grads: torch's
        multiply takes a float64 coefficient in float32 for float32 grads);
        else float64, the same bits on every rank."""
        if self.local_float64:
            return torch.clamp(max_norm / (self.wide + 1e-6), max=1.0)
        c32 = torch.clamp(max_norm / (self.wide.to(torch.float32) + 1e-6), max=1.0)
        if self.everyone_known:
            return c32 if for_this_rank else c32.double()
        c64 = torch.clamp(max_norm / (self.wide + 1e-6), max=1.0)
        everyone = torch.where(self.present[-1], c64, c32.double())
        return everyone.to(torch.float32) if for_this_rank else everyone

    def agreed(self) -> torch.Tensor:
        """The total (float64) rounded as the dtype every rank's grads promote
        to: the same bits on every rank, where `total` is in this rank's dtype
        (chosen on the device, so no host sync)."""
        f16, bf16, f32, f64 = self.present.unbind()
        wide = self.wide
        as_dtype = {d: wide.to(d).to(torch.float64) for d in _RESULT_DTYPES}
        rounded = torch.where(f16, as_dtype[torch.float16], wide.to(torch.get_default_dtype()).to(torch.float64))
        rounded = torch.where(bf16, as_dtype[torch.bfloat16], rounded)
        rounded = torch.where(f32 | (f16 & bf16), as_dtype[torch.float32], rounded)
        return torch.where(f64, wide, rounded)


def total_norm(
    tensors: list, norm_type, error_if_nonfinite: bool, foreach, name: str, process_group, work=None
) -> ShardedTotal:
    """The total norm of grads sharded over ranks (see ShardedTotal; the
    local GradList lets the caller scale without gathering again).  Every
    rank must call it with the same kinds of grads.

    Nothing that can fail on one rank only may stop it before a collective:
    if this rank's local norm raises (say a named backend that cannot serve
    its grads), it still joins every collective with a NaN and a failure
    flag, then raises; the other ranks get a NaN total and leave their grads
    alone (with error_if_nonfinite=True they raise too).  No rank waits forever.
    The total's dtype is the promotion of this rank's grads' dtypes (no host
    sync), or of every rank's with error_if_nonfinite=True (which syncs).
    `work`: the GradList of `tensors` if the caller has one (plain tensors on
    one device: no Python loop over them here)."""
    p = float(norm_type)  # torch's ValueError / TypeError for 'fro', None
    if p == 0.0:
        raise ValueError(P0_MESSAGE)
    cls = dtensor_class()
    plain, by_spec = (tensors, {}) if work is not None else _split_by_spec(tensors, cls)
    if by_spec and plain:
        raise RuntimeError(MIXED_MESSAGE)
    mesh = next(iter(by_spec.values()))[0] if by_spec else None
    if mesh is not None:  # DTensors: the global sizes, the same on every rank
        _raise_if_torch_would(tensors, p, foreach)
    groups = {}  # (mesh id, mesh dims sharded on) -> (mesh, those dims, local shards)
    partial = False
    for group_mesh, placements, members in by_spec.values():
        if _is_partial(placements):  # unreduced values: reduce them (for the norm only)
            partial = True
            from torch.distributed.tensor import Replicate

            placements = tuple(Replicate() if pl.is_partial() else pl for pl in placements)
            members = [t.redistribute(group_mesh, placements) for t in members]
        dims = tuple(i for i, pl in enumerate(placements) if pl.is_shard())
        groups.setdefault((id(group_mesh), dims), (group_mesh, dims, []))[2].extend(t._local_tensor for t in members)

    failure = None
    local_dtypes = set()  # of this rank's norms
    local_works = []  # the GradList of each local_state call (None where there was none)

    def local_state(tensors_, device, work_=None):
        nonlocal failure
        try:
            power, work_ = _local_power(tensors_, p, name, foreach, device, work_)
        except Exception as exc:  # noqa: BLE001 - raised below, after the collectives
            failure = failure or exc
            power = torch.full((), float("nan"), dtype=torch.float64, device=tensors_[0].device if tensors_ else device)
        dtypes = work_.dtypes if work_ is not None else _norm_dtypes(tensors_)
        local_dtypes.update(dtypes)
        local_works.append(work_)
        return _state(power, failure is not None, dtypes, p)

    fallback_device = _collective_device(process_group) if process_group is not None else torch.device("cpu")
    state = local_state(plain, fallback_device, work) if plain or not groups else None
    for group_mesh, shard_dims, shards in groups.values():
        group_state = local_state(shards, fallback_device)
        for dim in shard_dims:  # same order on every rank: grads come in the same order
            group_state = _all_reduce(group_state, p, group_mesh.get_group(dim), group_state.device)
        state = _combine_states(state, group_state, p)
    if process_group is not None:
        state = _all_reduce(state, p, process_group, fallback_device)
    if failure is not None:
        raise failure

    wide = _from_power(_value(state), p)
    result_dtype = promoted_dtype(local_dtypes) if local_dtypes else torch.get_default_dtype()
    if error_if_nonfinite:  # a host sync anyway: take the dtype all ranks' grads promote to, and check alike
        flags = state[_FAILED:].tolist()
        if flags[0] > 0:
            raise RuntimeError("fastclip: the local norm failed on another rank of the group (see its error)")
        everyone = {d for d, present in zip(_RESULT_DTYPES, flags[1:]) if present > 0}
        result_dtype = promoted_dtype(everyone) if everyone else result_dtype
    total = wide.to(result_dtype)
    if error_if_nonfinite and not bool(torch.isfinite(total)):  # every rank sees the same total
        raise RuntimeError(nonfinite_message(p))
    if mesh is not None:
        from torch.distributed.tensor import Replicate

        total = cls.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
    # The local GradList is in the order of `tensors` when one call took them
    # all: plain tensors, or DTensors of one spec that were not redistributed.
    in_order = len(local_works) == 1 and len(by_spec) <= 1 and not partial
    everyone_known = process_group is None or error_if_nonfinite
    return ShardedTotal(
        total, wide, state[_DTYPES:] > 0, everyone_known, result_dtype == torch.float64, state[_FAILED] > 0,
        local_works[0] if in_order else None,
    )


def _norm_dtypes(tensors) -> set:
    """The dtypes of the tensors' norms (real for complex tensors)."""
    return {d.to_real() if d.is_complex else d for d in set(map(_dtype_of, tensors))}
