"""no_grad: fastclip's entry points run without autograd, as torch's clip
functions do (torch.nn.utils.clip_grad's _no_grad): a max_norm, bound or
total_norm tensor that requires grad must not make the in-place writes of
the torch paths record a graph (or refuse to write a leaf that needs grad)."""

from __future__ import annotations

import functools

import torch

_set_grad_enabled = torch._C._set_grad_enabled


def no_grad(fn):
    @functools.wraps(fn)
    def without_autograd(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced: the context manager dynamo knows
            with torch.no_grad():
                return fn(*args, **kwargs)
        if not torch.is_grad_enabled():  # (the common case inside an outer entry point or no_grad block)
            return fn(*args, **kwargs)
        _set_grad_enabled(False)  # (a context manager costs a few microseconds a call)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_grad_enabled(True)

    return without_autograd
