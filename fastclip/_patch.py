"""fastclip.patch(): point torch.nn.utils' clipping functions at fastclip, so
frameworks that call torch (Lightning, HF Trainer / accelerate, torchtitan,
timm, plain loops) clip with it unchanged.

Only module attributes are replaced: `torch.nn.utils.X` and
`torch.nn.utils.clip_grad.X`.  Code that looked a function up before the
patch (`from torch.nn.utils import clip_grad_norm_` at import time) keeps
torch's; patch before importing such code.  torch's own functions stay
reachable as fastclip's fallback (fastclip/backends/torch_ref.py holds them),
so a patched process still hands unusual calls to the real torch code.
"""

from __future__ import annotations

import contextlib

import torch.nn.utils
import torch.nn.utils.clip_grad

from . import _api

# module -> the attributes fastclip replaces there
_CLIP_GRAD_NAMES = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_")
_TARGETS = {
    torch.nn.utils: (*_CLIP_GRAD_NAMES, "get_total_norm", "clip_grads_with_norm_"),
    torch.nn.utils.clip_grad: _CLIP_GRAD_NAMES,
}
_originals: dict = {}  # (module, attribute) -> what was there before patch()


def _ours(attribute: str):
    return getattr(_api, attribute)


def patch() -> bool:
    """Make torch.nn.utils' clipping functions fastclip's.  Idempotent;
    returns True if this call changed anything."""
    changed = False
    for module, attributes in _TARGETS.items():
        for attribute in attributes:
            current = getattr(module, attribute, None)
            if current is None or current is _ours(attribute):
                continue
            _originals[(module, attribute)] = current
            setattr(module, attribute, _ours(attribute))
            changed = True
    return changed


def unpatch() -> bool:
    """Put torch's functions back where fastclip's still stand (an attribute
    someone replaced after patch() is left alone).  Returns True if this
    call changed anything."""
    changed = False
    for (module, attribute), original in list(_originals.items()):
        if getattr(module, attribute, None) is _ours(attribute):
            setattr(module, attribute, original)
            changed = True
        del _originals[(module, attribute)]
    return changed


def is_patched() -> bool:
    """Do torch.nn.utils' clipping functions point at fastclip?"""
    return all(
        getattr(module, attribute, None) is _ours(attribute)
        for module, attributes in _TARGETS.items()
        for attribute in attributes
        if hasattr(module, attribute)
    )


@contextlib.contextmanager
def patched():
    """`with fastclip.patched(): ...`: patched inside the block; afterwards
    as before it (a process already patched stays patched)."""
    changed = patch()
    try:
        yield
    finally:
        if changed:
            unpatch()
