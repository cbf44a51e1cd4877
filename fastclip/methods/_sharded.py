"""The segmented methods on grads sharded over ranks: DTensor grads (FSDP2,
tensor parallel) and grads that are this rank's shards of a whole
(`process_group=`).

Each rank reduces its local shards per segment (p-th power sums, or maxima
for the inf-norm; the weights' for AGC; the counts for statistics) into one
float64 vector, the vector is all-reduced, and each rank then computes every
segment's coefficient from the reduced powers and scales its own shards.

Which ranks a segment's vector is reduced over:
* DTensor grads, grouped by mesh and placements: the mesh dims they are
  sharded on (a dim they are replicated on holds copies, counted once).  For
  AGC, whose units are dim-0 slices, only dims sharded along a tensor dim
  other than 0: a Shard(0) shard holds whole units.  Partial (unreduced)
  grads are reduced first; a weight placed otherwise than its grad is
  redistributed to the grad's placements.
* `process_group`: the whole group (for AGC: the shards are cut along dims
  other than 0, so every rank holds a part of every unit).
Every rank must call with the same grads in the same order, as for
clip_grad_norm_.  If this rank's local reduction fails, it still joins every
collective (with NaN and a failure flag), then raises; the other ranks leave
their grads alone.
"""

from __future__ import annotations

import math

import torch

from .. import _dispatch, _distributed
from .._ext import NORM_KINDS
from .._work import collect, increment_version
from ..backends.base import Coefficient, SegmentCall, SegmentOutputs
from . import _segmented as seg

F64 = torch.float64


class Sharded:
    """The local view of a sharded call: local grads (and weights), the
    DTensor wrappers (their version counters follow their shards), whether
    each grad is cut into dim-0 units (AGC), and the reduction groups:
    key -> (mesh or None, mesh dims, indices of the grads)."""

    def __init__(self, grads, weights, process_group, agc: bool):
        cls = _distributed.dtensor_class()
        is_dt = [cls is not None and isinstance(g, cls) for g in grads]
        if any(is_dt) and not all(is_dt):
            raise RuntimeError(_distributed.MIXED_MESSAGE)
        if any(is_dt) and process_group is not None:
            raise ValueError(
                "fastclip: process_group= with DTensor grads: the per-segment methods reduce DTensors over "
                "their own mesh; pass plain shards with process_group, or DTensors without it"
            )
        self.wrappers = [g for g, d in zip(grads, is_dt) if d]
        self.local, self.local_weights, self.sliced, self.groups = [], [], [], {}
        # what the coefficients scale: each grad's own shard (for a Partial grad
        # its unreduced piece, read from a reduced copy: scaling is linear)
        self.targets = []
        for i, g in enumerate(grads):
            w = weights[i] if weights is not None else None
            # AGC's units: dim-0 slices, unless the (global) tensor is one unit
            sliced = agc and g.dim() >= 2 and g.shape[0] > 1
            if is_dt[i]:
                self.targets.append(g._local_tensor)
                g, w, key, mesh, dims = self._dtensor_local(g, w, sliced)
            else:
                self.targets.append(g)
                key, mesh, dims = "process_group", None, ()
            self.local.append(g)
            self.local_weights.append(w)
            self.sliced.append(sliced)
            self.groups.setdefault(key, (mesh, dims, []))[2].append(i)
        self.process_group = process_group
        if process_group is not None:  # a rank with no grads still joins the collective
            self.groups.setdefault("process_group", (None, (), []))

    @staticmethod
    def _dtensor_local(g, w, sliced):
        from torch.distributed.tensor import Replicate, Shard

        mesh, placements = g.device_mesh, tuple(g.placements)
        if any(pl.is_partial() for pl in placements):  # unreduced values: reduce them first
            placements = tuple(Replicate() if pl.is_partial() else pl for pl in placements)
            g = g.redistribute(mesh, placements)
        if w is not None and (w.device_mesh != mesh or tuple(w.placements) != placements):
            w = w.redistribute(mesh, placements)
        if sliced:  # a Shard(0) shard holds whole units: reduce only over dims cut along another tensor dim
            dims = tuple(i for i, pl in enumerate(placements) if isinstance(pl, Shard) and pl.dim != 0)
        else:
            dims = tuple(i for i, pl in enumerate(placements) if pl.is_shard())
        local_w = w._local_tensor if w is not None else None
        return g._local_tensor, local_w, (id(mesh), dims), mesh, dims

    def agc_segments(self) -> tuple[list, list, int]:
        """Per local grad, its first unit's segment and slice length (0: one
        unit); the number of units.  Ranks reduced together hold the same rows."""
        first, lens, count = [], [], 0
        for g, sliced in zip(self.local, self.sliced):
            first.append(count)
            if sliced:
                lens.append(g.numel() // g.shape[0] if g.numel() else 0)  # (no elements here: no units either)
                count += g.shape[0]
            else:
                lens.append(0)
                count += 1
        return first, lens, count


def check_norm_type(p: float, grads, process_group) -> None:
    """What the sharded path refuses or raises before any collective (alike on every rank)."""
    if p == 0.0:
        raise ValueError(_distributed.P0_MESSAGE)
    if p < 0 or math.isnan(p):
        raise ValueError(f"fastclip: norm_type={p} with sharded grads: the per-segment methods take p > 0 or inf")
    if p == math.inf and process_group is None and any(g.numel() == 0 for g in grads):  # DTensors: global sizes
        from .._errors import empty_inf_norm_message

        raise RuntimeError(empty_inf_norm_message(None))


def _local_vector(sharded, members, first, lens, S, kind, p, name, counts, weights_wanted):
    """(powers [S], weight powers [S] or None, counts [2] or None) of this
    rank's tensors `members` (indices into sharded.local), float64 on their
    device: a fused backend if one serves them, else torch."""
    tensors = [sharded.local[i] for i in members]
    device = tensors[0].device if tensors else None
    firsts = [first[i] for i in members] if first is not None else list(members)
    slices = [lens[i] for i in members] if lens is not None else None
    if kind is not None and tensors and S > 0:  # (S == 0: Shard(0) shards without rows, say; torch's empty vectors)
        _grads, work, why = collect(tensors, False)
        fused = _dispatch.select(name, work, why) if work is not None else None
        if fused is not None and not (fused.needs_dense and work.strided_indices()):
            weights = [sharded.local_weights[i] for i in members] if weights_wanted else None
            if weights is None or all(w.is_contiguous() and g.is_contiguous() for w, g in zip(weights, tensors)):
                out = SegmentOutputs(
                    powers=torch.zeros(S, dtype=F64, device=device),
                    weight_powers=torch.zeros(S, dtype=F64, device=device) if weights_wanted else None,
                    counts=torch.zeros(2, dtype=torch.int64, device=device) if counts else None,
                )
                fused.segment_reduce(SegmentCall(work, S, firsts, slices, weights), kind, out)
                return out.powers, out.weight_powers, out.counts
    return _torch_vector(sharded, members, firsts, slices, S, p, counts, weights_wanted, device)


def _torch_vector(sharded, members, firsts, slices, S, p, counts, weights_wanted, device):
    """What _local_vector computes, with torch ops (float64)."""
    device = device or torch.device("cpu")
    powers = torch.zeros(S, dtype=F64, device=device)
    wpowers = torch.zeros(S, dtype=F64, device=device) if weights_wanted else None
    count = torch.zeros(2, dtype=torch.int64, device=device) if counts else None
    for k, i in enumerate(members):
        g = sharded.local[i]
        sliced = sharded.sliced[i]
        for target, t in ((powers, g), (wpowers, sharded.local_weights[i] if weights_wanted else None)):
            if target is None or t.numel() == 0:
                continue
            x = t.detach().to(F64)
            if sliced:
                unit = x.reshape(x.shape[0], -1)
                values = _powers_of(unit, p, dim=1)
                index = torch.arange(firsts[k], firsts[k] + x.shape[0], device=device)
            else:
                values = _powers_of(x.reshape(1, -1), p, dim=1)
                index = torch.full((1,), firsts[k], dtype=torch.long, device=device)
            _fold_into(target, index, values.to(device), p)
        if count is not None:
            count[0] += (~torch.isfinite(g)).sum().to(device)
            count[1] += (g == 0).sum().to(device)
    return powers, wpowers, count


def _powers_of(x: torch.Tensor, p: float, dim: int) -> torch.Tensor:
    if p == math.inf:
        return torch.linalg.vector_norm(x, p, dim=dim)
    return torch.linalg.vector_norm(x, p, dim=dim).pow(p)


def _fold_into(target, index, values, p) -> None:
    if p == math.inf:
        current = target.index_select(0, index)
        nan = torch.isnan(current) | torch.isnan(values)
        merged = torch.where(nan, torch.full_like(values, math.nan), torch.maximum(current, values))
        target.index_copy_(0, index, merged)
    else:
        target.index_add_(0, index, values)


def _segments_of(sharded, members, first, lens) -> list:
    """The segment ids the tensors `members` touch, sorted, each once."""
    ids = set()
    for i in members:
        f = first[i] if first is not None else i
        n = sharded.local[i].shape[0] if sharded.sliced[i] else 1  # (a slice may hold no elements here)
        ids.update(range(f, f + n))
    return sorted(ids)


def reduced_powers(sharded, first, lens, S, p, name, counts=False, weights=False):
    """(powers, weight powers, counts, failed elsewhere): the local vectors
    reduced over the ranks (see the module's docstring), float64 (counts
    int64) on the collective's device, and a 0-dim bool that is true when the
    local reduction failed on another rank.

    Each mesh's reduction group reduces a vector of only the segments its
    tensors touch (the ranks reduced together hold the same ones, in the
    same order), scattered into the whole vector after; a process group
    reduces the whole vector."""
    import torch.distributed as dist

    kind = NORM_KINDS.get(p)
    op = dist.ReduceOp.MAX if p == math.inf else dist.ReduceOp.SUM
    total_p = total_w = total_c = failed_any = None
    failure = None
    for key, (mesh, dims, members) in sharded.groups.items():
        # process_group: every segment (a rank may lack a group's grads: its None grads; ids must line up)
        ids = list(range(S)) if key == "process_group" else _segments_of(sharded, members, first, lens)
        compact = {s: k for k, s in enumerate(ids)}
        # each member's first segment among the group's (a tensor with no rows here has none: the one before)
        local_first, last = [0] * len(sharded.local), 0
        for i in members:
            last = local_first[i] = compact.get(first[i] if first is not None else i, last)
        try:
            vp, vw, vc = _local_vector(sharded, members, local_first, lens, len(ids), kind, p, name, counts,
                                       weights)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - raised below, after the collectives
            failure = failure or exc
            where = sharded.local[members[0]].device if members else None  # (a mesh's collectives run there: NCCL)
            vp = torch.full((len(ids),), math.nan, dtype=F64, device=where)
            vw = torch.full((len(ids),), math.nan, dtype=F64, device=where) if weights else None
            vc = torch.zeros(2, dtype=torch.int64, device=where) if counts else None
        if key == "process_group":
            groups = [sharded.process_group] if sharded.process_group is not None else []
            device = _distributed._collective_device(sharded.process_group) if groups else vp.device
        else:
            groups = [mesh.get_group(d) for d in dims]
            device = vp.device
        state = _pack(vp, vw, vc, failure is not None, p, device)
        for group in groups:  # the same order on every rank
            if p == math.inf and counts:  # maxima and counts need two ops: one all-gather, reduced here
                flat = state.new_empty(dist.get_world_size(group) * state.numel())
                dist.all_gather_into_tensor(flat, state, group=group)
                rows = flat.view(-1, state.numel())  # one row per rank
                state = torch.cat([rows[:, :-2].amax(dim=0), rows[:, -2:].sum(dim=0)])
            else:
                dist.all_reduce(state, op=op, group=group)
        vp, vw, vc, failed = _unpack(state, len(ids), weights, counts)
        if total_p is None:
            total_p = torch.zeros(S, dtype=F64, device=state.device)
            total_w = torch.zeros(S, dtype=F64, device=state.device) if weights else None
            total_c = torch.zeros(2, dtype=torch.int64, device=state.device) if counts else None
            failed_any = torch.zeros((), dtype=torch.bool, device=state.device)
        index = seg.to_device(torch.tensor(ids, dtype=torch.long), total_p.device)
        _fold_into(total_p, index, vp.to(total_p.device), p)
        if weights:
            _fold_into(total_w, index, vw.to(total_w.device), p)
        if counts:
            total_c += vc.to(total_c.device)
        failed_any |= failed.to(failed_any.device)
    if failure is not None:
        raise failure
    if total_p is None:  # no grads and no group: nothing to reduce
        total_p = torch.zeros(S, dtype=F64)
        total_w = torch.zeros(S, dtype=F64) if weights else None
        total_c = torch.zeros(2, dtype=torch.int64) if counts else None
        failed_any = torch.zeros((), dtype=torch.bool)
    return total_p, total_w, total_c, failed_any


def _pack(vp, vw, vc, failed, p, device) -> torch.Tensor:
    """[powers (NaN as 0), weight powers, NaN flags of both, failure flag, counts]: one
    float64 vector (gloo's MAX may drop a NaN: the flags carry it)."""
    parts = [vp.to(device, F64)] + ([vw.to(device, F64)] if vw is not None else [])
    values = torch.cat(parts)
    flags = torch.isnan(values).to(F64)
    values = torch.nan_to_num(values, nan=0.0)
    tail = [torch.full((1,), 1.0 if failed else 0.0, dtype=F64, device=device)]
    if vc is not None:
        tail.append(vc.to(device, F64))
    return torch.cat([values, flags, *tail])


def _unpack(state, S, weights, counts):
    n = S * (2 if weights else 1)
    values = torch.where(state[n : 2 * n] > 0, torch.full_like(state[:n], math.nan), state[:n])
    failed = state[2 * n] > 0
    vc = state[2 * n + 1 : 2 * n + 3].to(torch.int64) if counts else None
    return values[:S], values[S:] if weights else None, vc, failed


def _fold(a, b, p):
    if p == math.inf:
        return torch.where(torch.isnan(a) | torch.isnan(b), torch.full_like(a, math.nan), torch.maximum(a, b))
    return a + b


# ---------------------------------------------------------------- after the reduction


def finish_and_apply(sharded, name, first, lens, S, p, powers, weight_powers, failed, coefficient, apply,
                     norms_dtype=None, total_dtype=None, nonfinite_error=None, narrow=None):  # fmt: skip
    """Norms, coefficients and the scaling of this rank's shards, from the
    reduced powers (every coefficient 1 where another rank failed)."""
    kind = NORM_KINDS.get(p)
    device = powers.device
    out = SegmentOutputs(
        powers=powers,
        weight_powers=weight_powers,
        norms=torch.zeros(S, dtype=norms_dtype, device=device) if norms_dtype is not None else None,
        coefs=torch.ones(S, dtype=F64, device=device) if coefficient.mode != "none" else None,
        total=torch.zeros((), dtype=total_dtype, device=device) if total_dtype is not None else None,
    )
    if S == 0:  # nothing here (AGC: only Shard(0) shards without rows): nothing to finish or scale
        return out
    fused, work = _named_work(sharded, name) if kind is not None else (None, None)
    call = None
    if fused is not None:
        call = SegmentCall(work, S, first, lens, sharded.local_weights if weight_powers is not None else None)
        coefficient = _to_device(coefficient, work.device)
        for field in ("powers", "weight_powers"):
            if getattr(out, field) is not None:
                setattr(out, field, getattr(out, field).to(work.device))
        for field in ("norms", "coefs", "total"):
            if getattr(out, field) is not None:
                setattr(out, field, getattr(out, field).to(work.device))
        fused.segment_finish(call, kind, out, coefficient)
    else:
        _torch_finish(sharded, first, lens, S, p, out, coefficient)
    if nonfinite_error is not None and out.norms is not None and seg.any_nonfinite(out.norms, narrow):
        raise RuntimeError(nonfinite_error)
    if apply and out.coefs is not None:
        coefs = torch.where(failed.to(out.coefs.device), torch.ones_like(out.coefs), out.coefs)
        if fused is not None and all(t is g for t, g in zip(sharded.targets, sharded.local)):
            fused.segment_apply(call, coefs)
        else:  # (Partial grads: their pieces, by torch)
            _torch_apply(sharded, first, lens, coefs)
        if sharded.wrappers:
            increment_version(sharded.wrappers)
    return out


def _named_work(sharded, name):
    tensors = sharded.local
    if not tensors or name == "torch":
        return None, None
    _grads, work, why = collect(tensors, False)
    if work is None:
        return None, None
    fused = _dispatch.select(name, work, why)
    if fused is None or (fused.needs_dense and work.strided_indices()):
        return None, None
    if sharded.local_weights and sharded.local_weights[0] is not None:
        if not all(w.is_contiguous() and g.is_contiguous() for w, g in zip(sharded.local_weights, tensors)):
            return None, None
    return fused, work


def _to_device(c: Coefficient, device) -> Coefficient:
    if c.max_norms is None:
        return c
    return Coefficient(c.mode, c.max_norms.to(device), c.clip_factor, c.eps)


def _segment_ids(sharded, first, lens):
    """Per local tensor: (first segment, its number of segments, cut into dim-0 slices)."""
    out = []
    for i, g in enumerate(sharded.local):
        f = first[i] if first is not None else i
        sliced = sharded.sliced[i]
        out.append((f, g.shape[0] if sliced else 1, sliced))
    return out


def _torch_finish(sharded, first, lens, S, p, out, coefficient) -> None:
    """Norms and coefficients with torch's own expressions (clip_grad_norm_'s,
    timm's AGC), in float32 unless a segment holds float64."""
    wide = torch.zeros(S, dtype=torch.bool, device=out.powers.device)
    for (f, n, _sliced), g, w in zip(_segment_ids(sharded, first, lens), sharded.local, sharded.local_weights):
        if g.dtype == F64 or (w is not None and w.dtype == F64):
            wide[f : f + n] = True
    root = (lambda x: x) if p == math.inf else (lambda x: x.pow(1.0 / p))
    norm = root(out.powers)
    working = torch.where(wide, norm, norm.to(torch.float32).to(F64))
    if out.norms is not None:
        out.norms.copy_(working)
    if out.total is not None:
        whole = out.powers.max() if p == math.inf else out.powers.sum()
        out.total.copy_(root(whole))
    if coefficient.mode == "clip_norm":
        m = coefficient.max_norms.to(working.device).expand(S)
        c32 = torch.clamp(m.float() / (working.float() + 1e-6), max=1.0).to(F64)
        c64 = torch.clamp(m / (working + 1e-6), max=1.0)
        out.coefs.copy_(torch.where(wide, c64, c32))
    elif coefficient.mode == "agc":
        wn = root(out.weight_powers)
        wn = torch.where(wide, wn, wn.to(torch.float32).to(F64))
        results = []
        for dtype in (torch.float32, F64):
            g, w = working.to(dtype), wn.to(dtype)
            mx = w.clamp(min=coefficient.eps) * coefficient.clip_factor
            results.append(torch.where(g < mx, torch.ones_like(g), mx / g.clamp(min=1e-6)).to(F64))
        out.coefs.copy_(torch.where(wide, results[1], results[0]))


def _torch_apply(sharded, first, lens, coefs) -> None:
    from ..backends.gpu_common import torch_scale

    for (f, n, sliced), g in zip(_segment_ids(sharded, first, lens), sharded.targets):
        if g.numel() == 0:
            continue
        c = coefs[f : f + n].to(g.device)
        if sliced:
            shape = (n,) + (1,) * (g.dim() - 1)
            opmath = F64 if g.dtype == F64 else torch.float32
            g.copy_(torch.where(c.view(shape) == 1.0, g, (g.to(opmath) * c.to(opmath).view(shape)).to(g.dtype)))
        else:
            torch_scale(g, c[0])
