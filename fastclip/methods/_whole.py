"""The grads of one step viewed as one vector: its 2-norm, then a scale by a
coefficient that stays on the device.  What the stateful clippers (ZClip,
QuantileClip's global mode) and the training-step functions share.

Plain grads on one device go straight to a fused backend's norm and scale
(one read; one read and write only where the coefficient is not exactly 1).
DTensor grads and grads sharded over a `process_group` go through the public
functions, which reduce over ranks; each rank then scales its own shards.
"""

from __future__ import annotations

import functools

import torch

from .. import _api, _dispatch, _distributed, _ops
from .._work import as_list, collect
from ..backends.base import NORM_KINDS

L2 = NORM_KINDS[2.0]


def eager_under_compile(fn):
    """Run `fn` eagerly under torch.compile (a graph break): its state lives
    on the host.  torch.compiler.disable at import would load torch._dynamo
    (seconds); this asks only when called, and dynamo is loaded then."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch._dynamo.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


class WholeNorm:
    """One step's grads: norm(), clip(max_norm), scale(coef)."""

    def __init__(self, params: list, name: str, process_group=None):
        self.name = name
        self.process_group = process_group
        self.agreed = None  # with process_group=: the norm as every rank rounds it (float64)
        self.coef = None  # with process_group=, after clip(): the coefficient it used (the same on every rank)
        self.grads, self.fused, self.work = gather(params, name, process_group)

    @property
    def device(self) -> torch.device:
        if not self.grads:
            return torch.device("cpu")
        return _distributed.local_tensor(self.grads[0]).device

    def norm(self) -> torch.Tensor:
        """The total 2-norm, a plain 0-dim tensor (torch's dtype: the grads' promoted one)."""
        if self.fused is not None:
            return self.fused.norm(self.work, L2)
        if self.process_group is not None:
            sharded = _distributed.total_norm(self.grads, 2.0, False, None, self.name, self.process_group)
            self.agreed = sharded.agreed()
            return sharded.total
        total = _api.get_total_norm(self.grads, 2.0, backend=self.name)
        return _distributed.full_value(total)

    def clip(self, max_norm: float) -> torch.Tensor:
        """torch's clip_grad_norm_(grads, max_norm); returns the norm before clipping."""
        if self.fused is not None and not self.work.scales_unlike_torch(self.work.result_dtype):
            return self.fused.clip_norm(self.work, L2, float(max_norm), False)[0]
        if self.process_group is not None:
            sharded = _api.clip_sharded(self.grads, max_norm, 2.0, False, None, self.name, self.process_group)
            self.agreed, self.coef = sharded.agreed(), sharded.coefficient(float(max_norm), for_this_rank=False)
            return sharded.total
        total = _api.clip_grad_norm_(_ops.holders(self.grads), max_norm, backend=self.name)
        return _distributed.full_value(total)

    def value(self, total: torch.Tensor) -> torch.Tensor:
        """The norm `total` (from norm() or clip()) as float64, the same bits on
        every rank (with process_group=, ranks holding other dtypes round the
        total otherwise: this is the rounding of the dtype all ranks promote to)."""
        return self.agreed if self.agreed is not None else total.to(torch.float64)

    def scale(self, coef: torch.Tensor, like_a_float: bool = False) -> None:
        """Every grad times the 0-dim `coef`, as torch's `grad.mul_(coef)`
        rounds it, or with like_a_float as `grad.mul_(float(coef))` does
        (they differ only for a 0-dim grad narrower than a float64 `coef`);
        nothing written where it is exactly 1."""
        fused_ok = self.fused is not None and (like_a_float or not self.work.scales_unlike_torch(coef.dtype))
        if fused_ok and self.fused.scale(self.work, coef):
            return
        if not self.grads:
            return
        if like_a_float and coef.dtype == torch.float64:  # a Python float promotes nothing
            narrow = [g.dim() == 0 and g.dtype != torch.float64 for g in self.grads]
            if any(narrow):  # their product as with float32(coef), the others' as with coef
                _api._scale_grads([g for g, n in zip(self.grads, narrow) if n], coef.float(), None, self.name)
                rest = [g for g, n in zip(self.grads, narrow) if not n]
                if rest:
                    _api._scale_grads(rest, coef, None, self.name)
                return
        _api._scale_grads(self.grads, coef, None, self.name)


def params_of(model_or_parameters) -> list:
    """A module's parameters, or the given iterable (or single tensor) as a list."""
    if isinstance(model_or_parameters, torch.nn.Module):
        return list(model_or_parameters.parameters())
    return as_list(model_or_parameters)


def gather(params: list, name: str, process_group=None) -> tuple:
    """(grads, fused backend, GradList) for the grads of `params`, or (grads,
    None, None) for torch's path (DTensor grads, a process group, a backend
    that declines them).  The grads and their table are gathered in one C++
    call; only a list the fast gather declines is searched for DTensors:
    host time is what a step on many small tensors costs."""
    grads, work, why = collect(params, True)
    if name == "torch" or not grads or process_group is not None:
        return grads, None, None
    if work is None and _distributed.has_dtensor(grads):
        return grads, None, None
    fused = _dispatch.select(name, work, why)
    return (grads, fused, work) if fused is not None else (grads, None, None)
