"""Clipping methods beyond torch's four functions, one file each, all made of
the same segmented primitives (fastclip/methods/_segmented.py)."""

from .agc import adaptive_clip_grad_
from .norm_groups import clip_grad_norm_groups_
from .per_tensor import clip_grad_norm_per_tensor_
from .quantile_clip import QuantileClip
from .stats import GradStats, grad_stats
from .training_step import clip_grad_norm_into_step_, unscale_clip_grad_norm_
from .value_range import clip_grad_range_
from .zclip import ZClip

__all__ = [
    "GradStats",
    "QuantileClip",
    "ZClip",
    "adaptive_clip_grad_",
    "clip_grad_norm_groups_",
    "clip_grad_norm_into_step_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_range_",
    "grad_stats",
    "unscale_clip_grad_norm_",
]
