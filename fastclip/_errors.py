"""Error types and torch's exact error texts."""

from __future__ import annotations

import torch
import torch.utils._foreach_utils


class BackendError(RuntimeError):
    """An explicitly named backend is unknown, unavailable, or cannot serve these gradients."""


def nonfinite_message(norm_type: float) -> str:
    return (
        f"The total norm of order {norm_type} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )


def empty_inf_norm_message(foreach) -> str:
    """torch's error for the inf-norm of a 0-element grad (CPU and CUDA alike)."""
    if foreach is False:
        return (
            "linalg.vector_norm cannot compute the inf norm on an empty tensor because the operation "
            "does not have an identity"
        )
    return (
        "_foreach_norm cannot compute the infinity norm on an empty tensor because the operation "
        "does not have an identity"
    )


# The range check c10 applies when torch converts clip_value to the grad dtype.
_CLAMP_LIMITS = {
    torch.float16: (torch.finfo(torch.float16).max, "c10::Half"),
    torch.bfloat16: (torch.finfo(torch.bfloat16).max, "c10::BFloat16"),
    torch.float32: (torch.finfo(torch.float32).max, "float"),
}


def check_clip_value(clip_value: float, tensors, dtypes) -> None:
    """Raise torch's RuntimeError if clip_value overflows one of the grad dtypes.

    torch raises on the first (device, dtype) group it clamps; when several
    dtypes overflow, its own grouping function tells which group comes first."""
    if clip_value != clip_value or abs(clip_value) == float("inf"):
        return
    overflowing = {d for d in dtypes if d in _CLAMP_LIMITS and abs(clip_value) > _CLAMP_LIMITS[d][0]}
    if not overflowing:
        return
    first = next(iter(overflowing))
    if len(overflowing) > 1:
        representatives = {}
        for t in tensors:
            representatives.setdefault(t.dtype, t)
        groups = torch.utils._foreach_utils._group_tensors_by_device_and_dtype([list(representatives.values())])
        first = next(dtype for (_, dtype) in groups if dtype in overflowing)
    raise RuntimeError(f"value cannot be converted to type {_CLAMP_LIMITS[first][1]} without overflow")


def check_clamp_like_torch(grads, clip_value: float) -> None:
    """torch's first error for clip_grad_value_(grads, clip_value), raised
    before any grad is written: torch clamps group by group (device, dtype),
    and in a group meets a grad it cannot write (expand()) or a clip_value
    the group's dtype cannot hold, whichever comes first (torch has written
    the grads before it by then)."""
    if not grads:
        return
    groups = torch.utils._foreach_utils._group_tensors_by_device_and_dtype([list(grads)])
    for (_device, dtype), ([tensors], _) in groups.items():
        for t in tensors:
            check_writable([t])
            check_clip_value(clip_value, [t], (dtype,))


def check_clamp_bounds(bounds, tensors, dtypes=None) -> None:
    """Raise torch's RuntimeError if a bound of grad.clamp_(lo, hi) does not fit
    the dtype of one of `tensors` (the first such tensor in order, as a loop
    of clamp_ meets it).  `dtypes`: the set of their dtypes, if known (then
    the tensors are looked at only when some bound overflows one)."""
    finite = [abs(float(b)) for b in bounds if abs(float(b)) != float("inf") and float(b) == float(b)]
    if not finite:
        return
    largest = max(finite)
    if dtypes is not None and all(largest <= _CLAMP_LIMITS.get(d, (largest,))[0] for d in dtypes):
        return
    for t in tensors:
        limit = _CLAMP_LIMITS.get(t.dtype)
        if limit is not None and largest > limit[0]:
            raise RuntimeError(f"value cannot be converted to type {limit[1]} without overflow")


# torch's error for an in-place write to a tensor whose elements share memory (expand()).
_INTERNAL_OVERLAP = (
    "unsupported operation: more than one element of the written-to tensor refers to a single memory location. "
    "Please clone() the tensor before performing the operation."
)
_has_internal_overlap = getattr(torch, "_debug_has_internal_overlap", lambda t: 0)


def unwritable(grads) -> bool:
    """Would torch's in-place ops refuse to write one of `grads` (elements that
    share memory, as expand() makes)?  (Traced code: torch's own ops decide.)"""
    if torch.compiler.is_compiling():
        return False
    return any(
        type(g) is torch.Tensor and g.layout == torch.strided and _has_internal_overlap(g) == 1  # 1: MemOverlap::Yes
        for g in grads
    )


def check_writable(grads) -> None:
    """torch's error for such a grad, raised before any grad is written (torch
    raises it on reaching that grad, after writing the ones before it)."""
    if unwritable(grads):
        raise RuntimeError(_INTERNAL_OVERLAP)
