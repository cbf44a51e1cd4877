"""Backend registry and selection.

backend=None means $FASTCLIP_BACKEND, else "auto".  "auto" takes the first
available fused backend, in order of preference, that is meant for the
grads' device type and serves them, and otherwise hands the call to torch
(the Triton backend also serves CPU tensors under TRITON_INTERPRET=1, for
tests, but "auto" never picks it for them).  A named fused backend that
cannot serve the call raises BackendError instead of falling back silently.
"""

from __future__ import annotations

import os
import warnings

from ._errors import BackendError
from ._work import NOT_TENSORS, GradList
from .backends import torch_ref
from .backends.base import FusedBackend
from .backends.cpu import CpuBackend
from .backends.cuda_backend import CudaBackend
from .backends.triton_backend import TritonBackend

# Fastest first, per device: "auto" walks this list.  On CUDA the C++ backend
# comes first: one launch per clip_grad_norm_ and the least host work per
# call (its GPU speed against Triton's is not measured yet: see README).
FUSED_BACKENDS: dict[str, FusedBackend] = {
    "cuda": CudaBackend(),
    "triton": TritonBackend(),
    "cpu": CpuBackend(),
}
BACKEND_NAMES = ("auto", *sorted(FUSED_BACKENDS), "torch")

_warned_device_types: set[str] = set()  # device types already warned about: no fused backend available


def resolve_name(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("FASTCLIP_BACKEND") or "auto"
    if name not in BACKEND_NAMES:
        source = "backend" if backend is not None else "FASTCLIP_BACKEND"
        raise ValueError(f"unknown fastclip backend {name!r} (from {source}); choose one of {list(BACKEND_NAMES)}")
    return name


def select(name: str, grads: GradList | None, why_not_fused: str) -> FusedBackend | None:
    """The fused backend for this call, or None to hand the call to torch."""
    if name == "torch":
        return None
    if name == "auto":
        if grads is None:
            return None
        for backend in FUSED_BACKENDS.values():
            if grads.device.type in backend.auto_device_types and backend.available and backend.serves(grads):
                return backend
        _warn_if_no_fused_backend(grads)
        return None
    backend = FUSED_BACKENDS[name]
    if not backend.available:
        raise BackendError(f"fastclip backend {name!r} is not available: {backend.status()['reason']}")
    if grads is None:
        if why_not_fused == NOT_TENSORS:  # not a backend's limit: torch raises its own error for them
            return None
        raise BackendError(f"fastclip backend {name!r} cannot serve {why_not_fused}; use backend='auto' or 'torch'")
    if not backend.serves(grads):
        raise BackendError(
            f"fastclip backend {name!r} cannot serve grads on device {grads.device}; use backend='auto' or 'torch'"
        )
    return backend


def _warn_if_no_fused_backend(grads: GradList) -> None:
    """Once per device type: "auto" hands the grads to torch because none of
    the fused backends meant for their device type is available at all (not
    built, or a dependency missing), as opposed to one that is available but
    does not take this particular call."""
    kind = grads.device.type
    meant = {name: b for name, b in FUSED_BACKENDS.items() if kind in b.auto_device_types}
    if not meant or kind in _warned_device_types or any(b.available for b in meant.values()):
        return
    _warned_device_types.add(kind)
    reasons = "; ".join(f"{name}: {b.status()['reason']}" for name, b in meant.items())
    warnings.warn(
        f"fastclip: no fused backend for {kind} grads ({reasons}); "
        "falling back to torch.nn.utils (slower, same results)",
        RuntimeWarning,
        stacklevel=4,
    )


def available_backends() -> list[str]:
    """Backends usable on this machine (fused ones first, then "torch")."""
    return [name for name, b in FUSED_BACKENDS.items() if b.available] + ["torch"]


def backend_info() -> dict:
    """Per backend: built, available, reason (why not), and versions."""
    info = {name: backend.status() for name, backend in FUSED_BACKENDS.items()}
    info["torch"] = torch_ref.status()
    return info
