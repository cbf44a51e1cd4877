"""What every fused backend provides.

The front door (fastclip/_api.py) validates arguments like torch, builds a
GradList (fastclip/_work.py) and calls one of these operations.  A backend
never sees Python parameters, generators or norm types it cannot fuse.
"""

from __future__ import annotations

import torch

from .._work import GradList

# Norm kinds shared with the kernels (csrc/cpu/row_kernels.h NormKind).
L1, L2, LINF = 1, 2, 3
FUSED_NORM_KINDS = {1.0: L1, 2.0: L2, float("inf"): LINF}


def status_dict(built: bool, available: bool, reason: str = "", version=None, **extra) -> dict:
    """A backend's status() as backend_info() and `python -m fastclip info` show it."""
    return {"built": built, "available": available, "reason": reason, "version": version, **extra}


class FusedBackend:
    name = ""
    auto_device_types: tuple[str, ...] = ()  # device types "auto" may give this backend

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

    def clip_details(self, grads: GradList, kind: int, max_norm: float) -> tuple[float, float]:
        """(the total the coefficient is computed from: float32 unless the norm is
        float64, the coefficient), without touching the grads.  For tests:
        torch's clip_grads_with_norm_ with that total must give our grads bit
        for bit."""
        raise NotImplementedError
