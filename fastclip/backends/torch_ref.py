"""The "torch" backend: torch.nn.utils itself, the reference for every result.

fastclip hands a whole call to these functions whenever no fused backend may
take it (sparse, complex or subclass grads, norm types other than 1/2/inf,
unsupported devices), so the behaviour, errors included, is torch's own.
torch < 2.6 lacks get_total_norm / clip_grads_with_norm_; equivalents built
from the same public pieces stand in for them there.
"""

from __future__ import annotations

import torch
import torch.nn.utils as _nn_utils
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from .._errors import nonfinite_message
from .base import status_dict

clip_grad_norm_ = _nn_utils.clip_grad_norm_
clip_grad_value_ = _nn_utils.clip_grad_value_


def status() -> dict:
    return status_dict(True, True, version=torch.__version__)


def _use_foreach(foreach, tensors, device) -> bool:
    if (foreach is None and _has_foreach_support(tensors, device)) or (foreach and _device_has_foreach_support(device)):
        return True
    if foreach:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return False


# The two functions below follow the steps of torch >= 2.6 as written down in
# docs/torch-contract.md, section 2.1.
def _compat_get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    first_device = tensors[0].device
    norms = []
    for (device, _), ([group], _) in _group_tensors_by_device_and_dtype([tensors]).items():
        if _use_foreach(foreach, group, device):
            norms.extend(torch._foreach_norm(group, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(g, norm_type) for g in group)
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(nonfinite_message(norm_type))
    return total


def _compat_clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm = float(max_norm)
    if len(grads) == 0:
        return
    scale_grads(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0), foreach)


def scale_grads(grads: list, coef: torch.Tensor, foreach=None) -> None:
    """grads *= coef as torch's clip_grads_with_norm_ multiplies them."""
    for (device, _), ([device_grads], _) in _group_tensors_by_device_and_dtype([grads]).items():
        if _use_foreach(foreach, device_grads, device):
            torch._foreach_mul_(device_grads, coef.to(device))
        else:
            device_coef = coef.to(device)
            for g in device_grads:
                g.mul_(device_coef)


get_total_norm = getattr(_nn_utils, "get_total_norm", _compat_get_total_norm)
clip_grads_with_norm_ = getattr(_nn_utils, "clip_grads_with_norm_", _compat_clip_grads_with_norm_)
