"""no_grad: fastclip's entry points run without autograd, as torch's clip
functions do (torch.nn.utils.clip_grad's _no_grad): a max_norm, bound or
total_norm tensor that requires grad must not make the in-place writes of
the torch paths record a graph (or refuse to write a leaf that needs grad)."""

from __future__ import annotations

import functools

import torch


def no_grad(fn):
    @functools.wraps(fn)
    def without_autograd(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return without_autograd
