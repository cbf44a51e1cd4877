"""fastclip.patch(): point torch.nn.utils' clipping functions at fastclip, so
frameworks that call torch (Lightning, HF Trainer / accelerate, torchtitan,
timm, plain loops) clip with it unchanged.

Only module attributes are replaced: in `torch.nn.utils`, clip_grad_norm_,
clip_grad_norm, clip_grad_value_, get_total_norm and clip_grads_with_norm_;
in `torch.nn.utils.clip_grad`, its public clip_grad_norm_, clip_grad_norm and
clip_grad_value_ (torch's own clip_grad_norm_ calls private helpers there,
which stay torch's); and, when timm is loaded, timm's adaptive_clip_grad in
`timm.utils`, `timm.utils.agc` and `timm.utils.clip_grad` (which imports it
by name), so `dispatch_clip_grad(..., mode='agc')` and timm's train.py
`--clip-mode agc` use fastclip's AGC (import timm before patching).  Code that looked a function up before the
patch (`from torch.nn.utils import clip_grad_norm_` at import time) keeps
torch's; patch before importing such code.  torch's own functions stay
reachable as fastclip's fallback (fastclip/backends/torch_ref.py holds them),
so a patched process still hands unusual calls to the real torch code.
"""

from __future__ import annotations

import contextlib
import sys

import torch.nn.utils
import torch.nn.utils.clip_grad

from . import _api
from .methods import agc as _agc

# module -> the attributes fastclip replaces there
_CLIP_GRAD_NAMES = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_")
_TARGETS = {
    torch.nn.utils: (*_CLIP_GRAD_NAMES, "get_total_norm", "clip_grads_with_norm_"),
    torch.nn.utils.clip_grad: _CLIP_GRAD_NAMES,
}
_originals: dict = {}  # (module, attribute) -> what was there before fastclip's function
_kept = False  # patch() was called: a patched() block must not undo it on exit


# timm's AGC, where timm is loaded
_TIMM_MODULES = ("timm.utils", "timm.utils.agc", "timm.utils.clip_grad")


def _timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """What patch() puts in place of timm.utils.adaptive_clip_grad (its signature): fastclip's AGC."""
    return _agc.adaptive_clip_grad_(parameters, clip_factor, eps, norm_type)


# under timm's own name, as fastclip's functions in torch.nn.utils carry torch's
_timm_adaptive_clip_grad.__name__ = _timm_adaptive_clip_grad.__qualname__ = "adaptive_clip_grad"


def _targets() -> dict:
    """module -> the attributes fastclip replaces there (timm's, if loaded)."""
    targets = dict(_TARGETS)
    for name in _TIMM_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "adaptive_clip_grad"):
            targets[module] = ("adaptive_clip_grad",)
    return targets


def _ours(attribute: str):
    if attribute == "adaptive_clip_grad":
        return _timm_adaptive_clip_grad
    return getattr(_api, attribute)


def _apply() -> list:
    """Point every target at fastclip; returns the (module, attribute) pairs changed."""
    changed = []
    for module, attributes in _targets().items():
        for attribute in attributes:
            current = getattr(module, attribute, None)
            if current is None or current is _ours(attribute):
                continue
            _originals[(module, attribute)] = current
            setattr(module, attribute, _ours(attribute))
            changed.append((module, attribute))
    return changed


def _restore(keys) -> bool:
    """Put back what was there before, where fastclip's function still stands
    (an attribute someone replaced after the patch is left alone)."""
    changed = False
    for key in keys:
        module, attribute = key
        original = _originals.pop(key, None)
        if original is not None and getattr(module, attribute, None) is _ours(attribute):
            setattr(module, attribute, original)
            changed = True
    return changed


def patch() -> bool:
    """Make torch.nn.utils' clipping functions fastclip's, until unpatch().
    Idempotent; returns True if this call changed anything."""
    global _kept
    _kept = True
    return bool(_apply())


def unpatch() -> bool:
    """Put torch's functions back where fastclip's still stand.  Returns True
    if this call changed anything."""
    global _kept
    _kept = False
    return _restore(list(_originals))


def is_patched() -> bool:
    """Do torch.nn.utils' clipping functions (and timm's AGC, where timm is
    loaded) point at fastclip?  False after timm is loaded into a patched
    process, until patch() is called again to route timm's names too."""
    return all(
        getattr(module, attribute, None) is _ours(attribute)
        for module, attributes in _targets().items()
        for attribute in attributes
        if hasattr(module, attribute)
    )


@contextlib.contextmanager
def patched():
    """`with fastclip.patched(): ...`: patched inside the block; on exit only
    what the block itself patched is put back, unless patch() was called
    meanwhile (so a process already patched, or patched inside the block,
    stays patched)."""
    global _kept
    kept_before, _kept = _kept, False
    changed = _apply()
    try:
        yield
    finally:
        if not _kept:
            _restore(changed)
        _kept = _kept or kept_before
