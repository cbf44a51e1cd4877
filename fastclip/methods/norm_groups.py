"""clip_grad_norm_groups_: one norm per group of parameters, all groups in one pass.

Megatron clips its main model and its MTP head with separate norms
(`param.grad_norm_group`); torch needs one clip_grad_norm_ call per group.
Here each group is a segment: one read of every grad for all group norms,
one pass that scales the groups whose coefficient is not 1.
"""

from __future__ import annotations

import itertools

import torch

from .. import _dispatch, _distributed, _ops
from .._errors import check_writable, empty_inf_norm_message, nonfinite_message
from .._no_grad import no_grad
from .._work import as_list
from ..backends import torch_ref
from ..backends.base import FUSED_NORM_KINDS, LINF, Coefficient
from . import _segmented as seg
from . import _sharded


@no_grad
def clip_grad_norm_groups_(
    groups, max_norm, norm_type=2.0, error_if_nonfinite=False, *, backend=None, process_group=None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` on each group of parameters, in one pass.

    ``groups``: a sequence of iterables of parameters, or a dict name ->
    iterable (in its order); groups must be disjoint.  ``max_norm``: a number,
    or one value per group (a sequence or a 1-D tensor).  Returns the 1-D
    tensor of the group norms before clipping (float32, or float64 when a grad
    is float64; an empty group's norm is 0).  ``error_if_nonfinite``: any
    group with a non-finite norm raises torch's error before any grad is
    touched (torch, called group by group, would have clipped the groups
    before it); a group of float16 (or bfloat16) grads alone has its norm
    checked as torch computes it, in that dtype.  DTensor grads and ``process_group``: as in clip_grad_norm_.
    """
    if torch.compiler.is_compiling():
        return _traced(groups, max_norm, norm_type, error_if_nonfinite, backend, process_group)
    name = _dispatch.resolve_name(backend)
    members, names, flat, owner = _groups(groups)
    norm_type = float(norm_type)
    single, many = seg.per_item(max_norm, len(members), "max_norm", "group")
    gathered = seg.gather(flat)  # every grad read once, in one C++ call where it can
    grads = gathered.grads
    group_of = owner if gathered.positions is None else [owner[i] for i in gathered.positions]
    dtype = seg.norms_dtype(grads, gathered.work)
    if process_group is not None or (gathered.work is None and _distributed.has_dtensor(grads)):
        _sharded.check_norm_type(norm_type, grads, process_group)
        sharded = _sharded.Sharded(grads, None, process_group, agc=False)
        powers, _w, _c, failed = _sharded.reduced_powers(sharded, group_of, None, len(members), norm_type, name)
        values = seg.values_for(single, many, list(range(len(members))), powers.device)
        out = _sharded.finish_and_apply(
            sharded, name, group_of, None, len(members), norm_type, powers, None, failed,
            Coefficient("clip_norm", values), True, norms_dtype=dtype,
            nonfinite_error=nonfinite_message(norm_type) if error_if_nonfinite else None,
            narrow=_narrow(grads, group_of, len(members)) if error_if_nonfinite else None,
        )  # fmt: skip
        return out.norms
    kind = FUSED_NORM_KINDS.get(norm_type)
    fused, work = seg.plan(name, grads, gathered) if kind is not None else (None, None)
    if fused is None or seg.overlapping(work):
        _check_grads_disjoint(grads, group_of, names)
        return _torch_path(members, grads, group_of, single, many, norm_type, error_if_nonfinite, dtype)
    if kind == LINF and work.has_empty():
        raise RuntimeError(empty_inf_norm_message(None))
    positions = list(range(len(members)))
    coefficient = Coefficient("clip_norm", seg.values_for(single, many, positions, work.device))
    torch_multiplies = work.scales_unlike_torch(dtype)  # (a 0-dim grad beside a float64 one: see GradList)
    out = seg.run(
        fused, work, kind, len(members), coefficient, first_segment=group_of, norms_dtype=dtype,
        nonfinite_error=nonfinite_message(norm_type) if error_if_nonfinite else None, apply=not torch_multiplies,
        narrow=_narrow(grads, group_of, len(members)) if error_if_nonfinite else None,
    )  # fmt: skip
    if torch_multiplies:  # our norms and coefficients, torch's multiply: each group's by its own dtype's coefficient
        check_writable(grads)
        for k in positions:
            group = [g for g, owner in zip(grads, group_of) if owner == k]
            wide = any(g.dtype == torch.float64 for g in group)
            if group:
                torch_ref.scale_grads(group, out.coefs[k].to(torch.float64 if wide else torch.float32))
    return out.norms


def _grads_by_group(members) -> tuple[list, list]:
    """(the grads of all groups in order, each grad's group), read in Python (traced code)."""
    grads, group_of = [], []
    for k, params in enumerate(members):
        for p in params:
            if p.grad is not None:
                grads.append(p.grad)
                group_of.append(k)
    return grads, group_of


def _groups(groups) -> tuple[list, list, list, list]:
    """The groups as lists of parameters, in order, and their names (dict keys
    or positions); all parameters in one list, and each one's group.  An
    error if one parameter is in two groups."""
    if isinstance(groups, torch.Tensor):
        raise TypeError("groups must be a sequence of iterables of parameters (or a dict of them), not a tensor")
    items = list(groups.values()) if isinstance(groups, dict) else list(groups)
    names = list(groups.keys()) if isinstance(groups, dict) else list(range(len(items)))
    members = [as_list(g) for g in items]
    flat = list(itertools.chain.from_iterable(members))
    owner = list(itertools.chain.from_iterable(itertools.repeat(k, len(ps)) for k, ps in enumerate(members)))
    if len(set(map(id, flat))) != len(flat):  # a parameter twice: in one group (allowed) or in two
        seen: dict = {}
        for name, params in zip(names, members):
            for p in params:
                first = seen.setdefault(id(p), name)
                if first != name:
                    raise ValueError(
                        f"groups must be disjoint: a parameter is in group {first!r} and in group {name!r}"
                    )
    return members, names, flat, owner


def _check_grads_disjoint(grads, group_of, names) -> None:
    """An error if grads of two groups share memory (distinct parameters
    holding the same grad, or overlapping views): torch, group by group,
    would clip that memory once per group."""
    spans = []
    for g, k in zip(grads, group_of):
        if type(g) is not torch.Tensor or g.layout != torch.strided or g.numel() == 0:
            continue
        last = sum((n - 1) * st for n, st in zip(g.shape, g.stride()))  # (torch's strides are not negative)
        spans.append((g.device, g.data_ptr(), g.data_ptr() + (last + 1) * g.element_size(), k))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    # Sweep: a run of spans that chain into one another holding two groups has two that overlap.
    device, end, group = None, 0, None
    for dev, start, stop, k in spans:
        if dev == device and start < end:
            if k != group:
                a, b = sorted((group, k))
                raise ValueError(
                    f"groups must be disjoint: group {names[a]!r} and group {names[b]!r} share gradient memory"
                )
            end = max(end, stop)
        else:
            device, end, group = dev, stop, k


def _by_group(grads, group_of, count) -> list:
    """Each group's grads, in order."""
    by_group = [[] for _ in range(count)]
    for g, k in zip(grads, group_of):
        by_group[k].append(g)
    return by_group


def _narrow(grads, group_of, count) -> dict:
    """The groups whose norm torch computes in float16 / bfloat16 (seg.narrow_segments)."""
    return seg.narrow_segments([seg.group_dtype(m) for m in _by_group(grads, group_of, count)])


def _torch_path(members, grads, group_of, single, many, norm_type, error_if_nonfinite, dtype) -> torch.Tensor:
    """torch's clip_grad_norm_ on each group, its errors raised before any grad is touched."""
    by_group = _by_group(grads, group_of, len(members))
    norms = [torch_ref.get_total_norm(gs, norm_type) for gs in by_group]
    if error_if_nonfinite and not all(bool(torch.isfinite(n)) for n in norms):
        raise RuntimeError(nonfinite_message(norm_type))
    check_writable(grads)
    device = grads[0].device if grads else torch.device("cpu")
    # the result first: its errors (a meta norm cannot be copied) before any write
    result = torch.stack([n.to(device=device, dtype=dtype) for n in norms]) if norms else torch.empty(0, dtype=dtype)
    for k, (gs, n) in enumerate(zip(by_group, norms)):
        if not gs:
            continue
        if single is not None:
            coef = torch.clamp(single / (n + 1e-6), max=1.0)
        else:
            m = many[0 if len(many) == 1 else k]
            m = m.to(device=n.device, dtype=n.dtype) if isinstance(m, torch.Tensor) else m
            coef = torch.clamp((n + 1e-6).reciprocal() * m, max=1.0)
        torch_ref.scale_grads(gs, coef)
    return result


# ---------------------------------------------------------------- torch.compile


def _traced(groups, max_norm, norm_type, error_if_nonfinite, backend, process_group):
    """Under torch.compile: the grads are read in traced code, the work is the generic op."""
    if process_group is not None:  # collectives: run eagerly (a graph break)
        return torch._dynamo.disable(clip_grad_norm_groups_)(
            groups, max_norm, norm_type, error_if_nonfinite, backend=backend, process_group=process_group
        )
    members, _names, _flat, _owner = _groups(groups)
    norm_type = float(norm_type)
    single, many = seg.per_item(max_norm, len(members), "max_norm", "group")
    grads, group_of = _grads_by_group(members)
    if not _ops.plain(grads) or norm_type not in FUSED_NORM_KINDS:  # torch's path, traced
        return _torch_path(members, grads, group_of, single, many, norm_type, error_if_nonfinite,
                           seg.norms_dtype(grads))  # fmt: skip
    sizes = [group_of.count(k) for k in range(len(members))]
    numbers = [norm_type, float(bool(error_if_nonfinite))]
    values = None
    if isinstance(many, torch.Tensor):  # (a 0-dim max_norm comes back as shape (1,): one value for every group)
        values = many.reshape(()) if many.shape[0] == 1 else many
    numbers += [single] if single is not None else [] if values is not None else list(many)
    return _ops.method_("groups", grads, numbers=numbers, ints=sizes, values=values, backend=backend)


def _eager_op(grads, weights, numbers, ints, values, backend):
    norm_type, error_if_nonfinite = numbers[0], bool(numbers[1])
    max_norm = values if values is not None else numbers[2] if len(numbers) == 3 else numbers[2:]
    groups, start = [], 0
    for size in ints:
        groups.append(_ops.holders(grads[start : start + size]))
        start += size
    return [clip_grad_norm_groups_(groups, max_norm, norm_type, error_if_nonfinite, backend=backend)]


def _fake_op(grads, numbers, ints):
    device = grads[0].device if grads else torch.device("cpu")
    return [torch.empty(len(ints), dtype=seg.norms_dtype(grads), device=device)]


_ops.register("groups", _eager_op, _fake_op)
