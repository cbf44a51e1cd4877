"""clip_grad_range_: every grad clamped to [min_value, max_value].

Keras/TF's `clip_by_value` with its asymmetric bounds; torch's
clip_grad_value_ is symmetric only.  Every grad becomes
`grad.clamp_(min_value, max_value)`, bit for bit (NaN elements, signed
zeros, min_value > max_value as torch.clamp has them), in one pass that
writes only the elements that change.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _dispatch, _distributed, _ops
from .._errors import check_clamp_bounds, check_writable
from .._no_grad import no_grad
from . import _segmented as seg

_NO_BOUND = "torch.clamp: At least one of 'min' or 'max' must not be None"


@no_grad
def clip_grad_range_(parameters, min_value=None, max_value=None, *, backend=None) -> None:
    """Clamp every gradient to ``[min_value, max_value]`` in place, as
    ``grad.clamp_(min_value, max_value)`` does; either bound may be None, not
    both (torch's error, nothing touched).  A bound that does not fit a
    grad's dtype raises torch's error before any grad is touched.  DTensor
    grads are clamped shard by shard (Partial ones by torch)."""
    if min_value is None and max_value is None:
        raise RuntimeError(_NO_BOUND)
    if torch.compiler.is_compiling():
        return _traced(parameters, min_value, max_value, backend)
    name = _dispatch.resolve_name(backend)
    gathered = seg.gather(parameters)  # (one C++ call where it can: host time is what many small grads cost)
    grads = gathered.grads
    bounds = [b for b in (min_value, max_value) if b is not None]
    plain = all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in bounds)
    if plain and not all(type(b) is float for b in bounds):  # torch's argument errors (Fraction, ints past 64 bits)
        # (on float64, which holds every float: whether a bound fits each grad's
        # dtype is check_clamp_bounds' question, answered with torch's text below)
        torch.empty(0, dtype=torch.float64).clamp_(min_value, max_value)
    if not plain or any(math.isnan(float(b)) for b in bounds):  # tensors, NaN: torch's own op
        return _torch_path(grads, min_value, max_value)
    lo = -math.inf if min_value is None else float(min_value)
    hi = math.inf if max_value is None else float(max_value)
    if gathered.work is None and _distributed.has_dtensor(grads):
        if _distributed.has_partial(grads):  # unreduced values: clamping is not linear
            return _torch_path(grads, min_value, max_value)
        grads = [_distributed.local_tensor(g) for g in grads]
        gathered = None
    if not (lo == -hi and hi >= 0) and any(map(torch.Tensor.is_neg, grads)):
        # a view with torch's negative bit holds -x, and clamping is odd in x only for
        # bounds -c, c with c >= 0 (clip_grad_value_'s rule)
        return _torch_path(grads, min_value, max_value)
    fused, work = seg.plan(name, grads, gathered)
    if fused is None:
        return _torch_path(grads, min_value, max_value)
    check_clamp_bounds(bounds, work.tensors, work.dtypes)  # torch's overflow error, before any write
    fused.clamp_range(work, lo, hi)
    return None


def _torch_path(grads, min_value, max_value) -> None:
    """torch's clamp on every grad, all computed before any grad is written
    (so that torch's errors leave every grad untouched)."""
    clamped = [g.clone().clamp_(min_value, max_value) for g in grads]
    check_writable(grads)
    for g, c in zip(grads, clamped):
        g.copy_(c)
    return None


# ---------------------------------------------------------------- torch.compile


def _traced(parameters, min_value, max_value, backend):
    """Under torch.compile: the grads are read in traced code, the work is the generic op."""
    _params, grads, _positions = seg.grads_of(parameters)
    bounds = [b for b in (min_value, max_value) if b is not None]
    # (b == b: not NaN; math.isnan cannot take the symbolic float of a traced call)
    numbers_ok = all(isinstance(b, numbers.Real) and not isinstance(b, bool) and b == b for b in bounds)
    if not _ops.plain(grads) or not numbers_ok:  # torch's own op, traced
        for g in grads:
            g.clamp_(min_value, max_value)
        return None
    lo = -math.inf if min_value is None else float(min_value)  # (no bound and an infinite one clamp alike)
    hi = math.inf if max_value is None else float(max_value)
    _ops.method_("range", grads, numbers=[lo, hi], backend=backend)
    return None


def _eager_op(grads, weights, numbers, ints, values, backend):
    clip_grad_range_(_ops.holders(grads), numbers[0], numbers[1], backend=backend)
    return _ops.nothing()


_ops.register("range", _eager_op, lambda grads, numbers, ints: _ops.nothing())
