"""What every fused backend provides.

The front doors (fastclip/_api.py for torch's four functions,
fastclip/methods/ for the others) validate arguments like torch (or like the
library a method mirrors), build a GradList (fastclip/_work.py) and call
these operations.  A backend never sees Python parameters, generators or
norm types it cannot fuse.

Besides torch's operations (a total norm, one scale, one clamp), every
backend has the three segmented primitives the other methods are made of
(csrc/common/segments.h): reduce per segment, a coefficient per segment,
apply per segment, each over a SegmentCall.
"""

from __future__ import annotations

import dataclasses

import torch

from .._ext import COEFFICIENT_MODES, DTYPE_CODES, NORM_KINDS
from .._work import GradList

# Norm types the kernels fuse, and their kind codes (csrc/common/norm_kind.h, through the extension).
FUSED_NORM_KINDS = NORM_KINDS
LINF = NORM_KINDS[float("inf")]


@dataclasses.dataclass
class SegmentCall:
    """One segmented call: the grads, which segment each belongs to, and (AGC)
    the weights read beside them.  Every grad is dense here (the method front
    doors give views to the GPU backends as contiguous copies)."""

    grads: GradList
    num_segments: int
    first_segment: list | None = None  # per grad, the id of its first segment; None: grad i is segment i
    slice_len: list | None = None  # per grad, elements per segment (dim-0 slices); 0 or None: the whole grad
    weights: list | None = None  # AGC: per grad, the parameter (same shape and strides), read with it
    _table: object = None

    @property
    def has_weights(self) -> bool:
        return self.weights is not None or (self._table is not None and self._table.has_weights)

    @property
    def table(self):
        """The grads' TensorTable with the segments (and weights) attached."""
        if self._table is None:
            wptrs = wcodes = None
            if self.weights is not None:
                wptrs = [w.data_ptr() for w in self.weights]
                wcodes = [DTYPE_CODES[w.dtype] for w in self.weights]
            self._table = self.grads.table.with_segments(
                self.first_segment, self.slice_len, self.num_segments, wptrs, wcodes
            )
        return self._table


@dataclasses.dataclass
class SegmentOutputs:
    """Where the primitives write, all on the grads' device (None: not asked for)."""

    powers: torch.Tensor  # float64 [S]: per segment, the sum of |g|^p (p = 1, 2) or max |g|
    weight_powers: torch.Tensor | None = None  # float64 [S]: the same for the weights (AGC)
    counts: torch.Tensor | None = None  # int64 [2]: elements that are inf or NaN, elements that are zero
    norms: torch.Tensor | None = None  # float32 or float64 [S]: the norms (float32-rounded unless float64)
    coefs: torch.Tensor | None = None  # float64 [S]: the coefficients
    total: torch.Tensor | None = None  # 0-dim, in its dtype: the norm of all segments together


@dataclasses.dataclass
class Coefficient:
    """The per-segment formula (csrc/common/coefficients.h) and its parameters."""

    mode: str  # "none" (norms only), "clip_norm", "agc"
    max_norms: torch.Tensor | None = None  # clip_norm: float64 [1] or [S] on the grads' device
    clip_factor: float = 0.0  # agc
    eps: float = 0.0  # agc

    @property
    def code(self) -> int:
        return COEFFICIENT_MODES[self.mode]


def status_dict(built: bool, available: bool, reason: str = "", version=None, **extra) -> dict:
    """A backend's status() as backend_info() and `python -m fastclip info` show it."""
    return {"built": built, "available": available, "reason": reason, "version": version, **extra}


class FusedBackend:
    name = ""
    auto_device_types: tuple[str, ...] = ()  # device types "auto" may give this backend
    needs_dense = False  # segmented calls must give views as contiguous copies (the GPU backends)

    def status(self) -> dict:
        """{'built': bool, 'available': bool, 'reason': str, ...versions}."""
        raise NotImplementedError

    @property
    def available(self) -> bool:
        return self.status()["available"]

    def serves(self, grads: GradList) -> bool:
        """True if this backend can run on the device of `grads`."""
        raise NotImplementedError

    def norm(self, grads: GradList, kind: int) -> torch.Tensor:
        """0-dim total norm on grads.device, in grads.result_dtype."""
        raise NotImplementedError

    def norm_wide(self, grads: GradList, kind: int) -> torch.Tensor:
        """0-dim float64 total norm on grads.device, before it is rounded to
        the grads' dtype: what a distributed reduction combines (fastclip/_distributed.py)."""
        raise NotImplementedError

    def clip_norm(self, grads: GradList, kind: int, max_norm: float, error_if_nonfinite: bool):
        """Fused clip_grad_norm_. Returns (total norm tensor, aborted): aborted
        means error_if_nonfinite was set, the norm is not finite, and nothing
        was modified."""
        raise NotImplementedError

    def scale(self, grads: GradList, coef: torch.Tensor) -> bool:
        """Multiply every grad by the 0-dim `coef` (skipped when it is exactly
        1).  Returns False, having done nothing, if it cannot take this coef."""
        raise NotImplementedError

    def clamp(self, grads: GradList, clip_value: float) -> None:
        """clip_grad_value_ in one pass; the caller has checked the range."""
        raise NotImplementedError

    # ------------------------------------------------------------ segmented primitives

    def segment_reduce(self, call: SegmentCall, kind: int, out: SegmentOutputs) -> None:
        """Per segment, out.powers (and out.weight_powers, out.counts when
        given), each segment's units folded in a fixed order."""
        raise NotImplementedError

    def segment_finish(self, call: SegmentCall, kind: int, out: SegmentOutputs, coefficient: Coefficient) -> None:
        """out.norms, out.coefs and out.total (those given) from out.powers."""
        raise NotImplementedError

    def segment_apply(self, call: SegmentCall, coefs: torch.Tensor) -> None:
        """Every grad of segment s times coefs[s], where that is not exactly 1."""
        raise NotImplementedError

    def segments(
        self, call: SegmentCall, kind: int, out: SegmentOutputs, coefficient: Coefficient, apply: bool
    ) -> None:
        """reduce, finish, and apply if asked (a backend may fuse them)."""
        self.segment_reduce(call, kind, out)
        self.segment_finish(call, kind, out, coefficient)
        if apply:
            self.segment_apply(call, out.coefs)

    def clamp_range(self, grads: GradList, lo: float, hi: float) -> None:
        """grad.clamp_(lo, hi) for every grad (+-inf: no bound; never NaN), in one pass."""
        raise NotImplementedError

    def clip_details(self, grads: GradList, kind: int, max_norm: float) -> tuple[float, float]:
        """(the total the coefficient is computed from: float32 unless the norm is
        float64, the coefficient), without touching the grads.  For tests:
        torch's clip_grads_with_norm_ with that total must give our grads bit
        for bit."""
        raise NotImplementedError
