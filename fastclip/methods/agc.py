"""adaptive_clip_grad_: adaptive gradient clipping (AGC, Brock et al. 2021, NFNets).

timm's semantics and defaults (`timm.utils.agc.adaptive_clip_grad`): the
units of a parameter are its slices along dim 0 (the whole tensor when it
has at most one dimension); a unit with grad G and weight W has
max_norm = clip_factor * max(‖W‖, eps), and is scaled by
max_norm / max(‖G‖, 1e-6) when ‖G‖ is not below max_norm.  Every unit is a
segment: one read of the weights and the grads together, one pass that
writes only the units that clip.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _dispatch, _distributed, _ext, _ops
from .._errors import check_writable
from .._no_grad import no_grad
from ..backends.base import FUSED_NORM_KINDS, LINF, Coefficient
from . import _segmented as seg
from . import _sharded

# torch's errors for timm's inf-norm of an empty unit (its text, missing space included)
_EMPTY_INF = "linalg.vector_norm cannot compute the inf norm on an empty tensor because the operation does not have an identity"
_EMPTY_DIM_INF = (
    "linalg.vector_norm cannot compute the inf norm on the dimension {}because this dimension is empty and "
    "the operation does not have an identity"
)


@no_grad
def adaptive_clip_grad_(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0, *, backend=None, process_group=None):
    """AGC in place, as ``timm.utils.adaptive_clip_grad`` (same arguments and defaults).

    Fused on every backend for norm types 1, 2 and inf: fp32 and fp64 norms
    accumulate in float64, fp16 and bf16 in float32, and the unit's
    coefficient is timm's formula in float32 (float64 for float64 tensors)
    from those norms.  DTensor grads: a unit split across ranks (a parameter
    sharded along a dim other than 0) has its norms reduced over them;
    ``process_group``: the parameters are this rank's shards along dims other
    than 0 (every rank holds every unit's part), reduced likewise.
    """
    if torch.compiler.is_compiling():
        return _traced(parameters, clip_factor, eps, norm_type, backend, process_group)
    name = _dispatch.resolve_name(backend)
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if process_group is None and _fast_path(params, clip_factor, eps, norm_type, name):
        return None
    pairs, norm_type_f, numbers_ok = _arguments(params, clip_factor, eps, norm_type)
    if norm_type_f is None:
        return _torch_path(pairs, clip_factor, eps, norm_type)
    kind = FUSED_NORM_KINDS.get(norm_type_f)
    if process_group is not None or _distributed.has_dtensor([g for _, g in pairs]):
        return _sharded_path(pairs, float(clip_factor), float(eps), norm_type_f, name, process_group)
    grads = [g for _, g in pairs]
    fused, work = seg.plan(name, grads) if kind is not None and numbers_ok else (None, None)
    if fused is None or not all(_fusable(w, g) for w, g in pairs) or seg.overlapping(work):
        return _torch_path(pairs, clip_factor, eps, norm_type_f)
    if kind == LINF:
        _check_no_empty_unit(pairs)
    weights, grads_in, written = [], [], []
    for w, g in pairs:
        if _layout_ok(w, g):
            weights.append(w)
            grads_in.append(g)
        else:  # views and mismatched layouts: contiguous copies, read in order, written back
            wc, gc = w.contiguous(), g.contiguous()
            weights.append(wc)
            grads_in.append(gc)
            written.append((g, gc))
    if written:
        fused, work = seg.plan(name, grads_in)
    first, lens, count = _segments(grads_in)
    seg.run(
        fused, work, kind, count, Coefficient("agc", clip_factor=float(clip_factor), eps=float(eps)),
        first_segment=first, slice_len=lens, weights=weights,
    )  # fmt: skip
    for g, gc in written:
        if gc is not g:
            g.copy_(gc)
    return None


def _fast_path(params, clip_factor, eps, norm_type, name) -> bool:
    """AGC done in the common case (plain dense grads and parameters of one
    shape, one device, a fused norm type), with the grads, weights and units
    described in two C++ calls instead of a Python loop over the parameters
    (host time that a GPU's AGC over a ResNet would otherwise be mostly made
    of).  False, with nothing written, when the general code must do it (it
    then reads the grads again)."""
    if name == "torch" or not _numbers_ok(clip_factor, eps):
        return False
    try:
        kind = FUSED_NORM_KINDS.get(float(norm_type))
    except (TypeError, ValueError, OverflowError):  # (the general path raises what it must, in its order)
        return False
    if kind is None or _ext.cpu is None:
        return False
    gathered = seg.gather(params)  # (torch's AttributeError for what has no .grad, as timm's loop)
    work = gathered.work
    if work is None or not gathered.grads or (kind == LINF and work.has_empty()):
        return False
    weights = gathered.params if gathered.positions is None else [gathered.params[i] for i in gathered.positions]
    described = _ext.cpu.agc_table(work.table, weights, gathered.grads, torch.Tensor, torch.nn.Parameter)
    fused = _dispatch.select(name, work, gathered.why) if described is not None else None
    if fused is None or seg.overlapping(work):
        return False
    table, count = described
    seg.run(fused, work, kind, count, Coefficient("agc", clip_factor=float(clip_factor), eps=float(eps)), table=table)
    return True


def _numbers_ok(clip_factor, eps) -> bool:
    """Are clip_factor and eps plain numbers the kernels take?  (A NaN eps is
    not: timm's clamp_(min=nan) makes every max_norm NaN, torch's path has it.)"""
    plain = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (clip_factor, eps))
    return plain and eps == eps  # (not NaN: math.isnan cannot take the symbolic float of a traced call)


def _arguments(params, clip_factor, eps, norm_type) -> tuple[list, float | None, bool]:
    """(weight, grad) of every parameter with a grad; norm_type as a float, or
    None for what timm hands to Tensor.norm as it is ('fro' and the like);
    whether clip_factor and eps are plain numbers the kernels take."""
    pairs = [(p.detach(), p.grad) for p in params if p.grad is not None]
    numbers_ok = _numbers_ok(clip_factor, eps)
    try:
        return pairs, float(norm_type), numbers_ok
    except (TypeError, ValueError):
        return pairs, None, numbers_ok


def _sharded_path(pairs, clip_factor, eps, p, name, process_group) -> None:
    """AGC on sharded parameters: each unit's norms reduced over the ranks that
    hold a part of it (methods/_sharded.py)."""
    grads, weights = [g for _, g in pairs], [w for w, _ in pairs]
    _sharded.check_norm_type(p, grads, process_group)
    if p == math.inf and process_group is None:  # DTensors' global shapes, before any collective
        _check_no_empty_unit(pairs)  # (process_group: an empty piece adds nothing; no rank sees the whole)
    sharded = _sharded.Sharded(grads, weights, process_group, agc=True)
    first, lens, count = sharded.agc_segments()
    powers, wpowers, _c, failed = _sharded.reduced_powers(sharded, first, lens, count, p, name, weights=True)
    _sharded.finish_and_apply(
        sharded, name, first, lens, count, p, powers, wpowers, failed,
        Coefficient("agc", clip_factor=clip_factor, eps=eps), True,
    )  # fmt: skip
    return None


def _segments(grads) -> tuple[list, list, int]:
    """Per grad, its first unit's segment id and its slice length (0: whole); the number of units."""
    first, lens, count = [], [], 0
    for g in grads:
        first.append(count)
        if g.dim() <= 1 or g.shape[0] <= 1:  # one unit (or none: a dim 0 of size 0)
            lens.append(0)
            count += 1
        else:
            lens.append(g.numel() // g.shape[0])
            count += g.shape[0]
    return first, lens, count


def _fusable(w: torch.Tensor, g: torch.Tensor) -> bool:
    """Can the kernels read this pair at all (plain tensors of one shape)?"""
    return type(w) is torch.Tensor and type(g) is torch.Tensor and w.shape == g.shape and w.device == g.device


def _layout_ok(w: torch.Tensor, g: torch.Tensor) -> bool:
    """Read in place: both contiguous, or with equal strides and every dim-0
    slice one dense block (channels_last convolution weights, say)."""
    if w.is_contiguous() and g.is_contiguous():
        return True
    if w.stride() != g.stride() or g.dim() < 2 or g.numel() == 0:
        return False
    inner = g.numel() // g.shape[0]
    if g.stride(0) != inner:
        return False
    rest = sorted((s, n) for s, n in zip(g.stride()[1:], g.shape[1:]) if n != 1)
    expected = 1
    for s, n in rest:
        if s != expected:
            return False
        expected *= n
    return True


def _check_no_empty_unit(pairs) -> None:
    """timm's inf-norm of an empty unit raises torch's error (the weight's first)."""
    for w, _g in pairs:
        if w.dim() <= 1 and w.numel() == 0:
            raise RuntimeError(_EMPTY_INF)
        if w.dim() >= 2 and w.shape[0] > 0 and w.numel() == 0:
            raise RuntimeError(_EMPTY_DIM_INF.format(next(d for d in range(1, w.dim()) if w.shape[d] == 0)))


def unitwise_norm(x: torch.Tensor, norm_type: float) -> torch.Tensor:
    """timm's unitwise_norm: the whole tensor's norm for ndim <= 1, else the
    norm over dims 1.. (kept as size 1)."""
    if x.ndim <= 1:
        return x.norm(norm_type)
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def _torch_path(pairs, clip_factor, eps, norm_type) -> None:
    """timm's adaptive_clip_grad, every new grad computed before any is written
    (so that its errors leave the grads untouched).  Grads that share memory
    (one grad on two parameters, views of one buffer) are then clipped in
    turn, each from the grads before it already written, as timm's loop does."""
    if torch.compiler.is_compiling():  # timm's loop itself, traced
        for w, g in pairs:
            g.detach().copy_(_timm_unit_clip(w, g, clip_factor, eps, norm_type))
        return None
    new = [_timm_unit_clip(w, g, clip_factor, eps, norm_type) for w, g in pairs]
    check_writable([g for _w, g in pairs])
    in_turn = seg.share_storage([g for _w, g in pairs])
    for (w, g), n in zip(pairs, new):
        g.detach().copy_(_timm_unit_clip(w, g, clip_factor, eps, norm_type) if in_turn else n)
    return None


def _timm_unit_clip(w, g, clip_factor, eps, norm_type) -> torch.Tensor:
    """timm's new grad for one parameter (its expression and rounding)."""
    max_norm = unitwise_norm(w, norm_type).clamp_(min=eps).mul_(clip_factor)
    grad_norm = unitwise_norm(g.detach(), norm_type)
    clipped = g.detach() * (max_norm / grad_norm.clamp(min=1e-6))
    return torch.where(grad_norm < max_norm, g.detach(), clipped)


# ---------------------------------------------------------------- torch.compile


def _traced(parameters, clip_factor, eps, norm_type, backend, process_group):
    """Under torch.compile: the grads and weights are read in traced code, the work is the generic op."""
    if process_group is not None:  # collectives: run eagerly (a graph break)
        return torch._dynamo.disable(adaptive_clip_grad_)(
            parameters, clip_factor, eps, norm_type, backend=backend, process_group=process_group
        )
    pairs, norm_type_f, numbers_ok = _arguments(parameters, clip_factor, eps, norm_type)
    if norm_type_f is None:
        return _torch_path(pairs, clip_factor, eps, norm_type)  # timm's code, traced
    grads, weights = [g for _, g in pairs], [w for w, _ in pairs]
    # (grads that are views of one buffer, as DDP's bucket views: Inductor's
    # decomposition of the op fails on them in torch 2.13, so they take timm's code)
    views = sum(g._base is not None for g in grads) > 1
    if views or not (_ops.plain(grads) and _ops.plain(weights) and numbers_ok and norm_type_f in FUSED_NORM_KINDS):
        return _torch_path(pairs, clip_factor, eps, norm_type_f)  # timm's code, traced
    _ops.method_("agc", grads, weights, numbers=[clip_factor, eps, norm_type_f], backend=backend)
    return None


class _Pair:
    """A parameter stand-in for the eager code: detach() is the weight, .grad the grad."""

    __slots__ = ("weight", "grad")

    def __init__(self, weight, grad):
        self.weight, self.grad = weight, grad

    def detach(self):
        return self.weight.detach()  # (the op may be handed the nn.Parameter itself)


def _eager_op(grads, weights, numbers, ints, values, backend):
    adaptive_clip_grad_([_Pair(w, g) for w, g in zip(weights, grads)], numbers[0], numbers[1], numbers[2],
                        backend=backend)  # fmt: skip
    return _ops.nothing()


_ops.register("agc", _eager_op, lambda grads, numbers, ints: _ops.nothing())
