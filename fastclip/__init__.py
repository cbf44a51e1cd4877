"""fastclip: fused gradient clipping, a drop-in for torch.nn.utils' clipping functions.

    import fastclip
    total = fastclip.clip_grad_norm_(model.parameters(), max_norm=1.0)

See README.md for the contract, the backends and the measured speed.
"""

from ._api import clip_grad_norm, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from ._dispatch import BACKEND_NAMES, available_backends, backend_info
from ._errors import BackendError
from ._patch import is_patched, patch, patched, unpatch
from .methods import (
    GradStats,
    QuantileClip,
    ZClip,
    adaptive_clip_grad_,
    clip_grad_norm_groups_,
    clip_grad_norm_into_step_,
    clip_grad_norm_per_tensor_,
    clip_grad_range_,
    grad_stats,
    unscale_clip_grad_norm_,
)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "BackendError",
    "GradStats",
    "QuantileClip",
    "ZClip",
    "adaptive_clip_grad_",
    "available_backends",
    "backend_info",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_norm_groups_",
    "clip_grad_norm_into_step_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_range_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_stats",
    "is_patched",
    "patch",
    "patched",
    "unpatch",
    "unscale_clip_grad_norm_",
]
