"""Shared fixtures: the backends under test and a fresh seed per test."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Without a GPU the Triton backend's kernels run on CPU tensors through
# Triton's interpreter, so the contract suite covers them too.  Set before
# fastclip (and its kernels) are imported.
# Likewise the CUDA backend's kernels run on CPU tensors in their emulation.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FASTCLIP_CUDA_EMULATE", "1")

from .helpers import ALL_BACKENDS, FUSED, gpu_only


def _speed_up_triton_interpreter():
    """Test speed only.  Triton's interpreter re-patches triton.language on
    every device-function call (2 ms each, most of an interpreted unit's
    time).  Within one kernel run the patches of a module's globals are
    already in place (nested patches are never undone), so patch each module
    once per run.  Skipped if this triton's interpreter is laid out otherwise,
    or with FASTCLIP_TEST_FAST_INTERPRETER=0."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    real_patch = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if real_patch is None or executor is None or getattr(executor, "_fastclip_shim", False):
        return
    real_run = executor.__call__
    patched: set = set()

    class NoScope:
        def restore(self):
            pass

    def patch_once(fn):
        key = id(fn.__globals__)
        if key in patched:
            return NoScope()
        patched.add(key)
        return real_patch(fn)

    def run(self, *args, **kwargs):
        patched.clear()  # the previous run restored its kernel's patches
        return real_run(self, *args, **kwargs)

    interpreter._patch_lang = patch_once
    executor.__call__ = run
    executor._fastclip_shim = True


# Optional: FASTCLIP_TEST_FAST_INTERPRETER=0 runs Triton's interpreter as
# shipped (CI runs one leg that way, so the suite never depends on the shim).
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FASTCLIP_TEST_FAST_INTERPRETER", "1") != "0":
    _speed_up_triton_interpreter()


def _on_its_device(name):
    """Yield the backend name; for a backend that serves only CUDA tensors,
    with CUDA as torch's default device meanwhile, so the tests' tensors
    (and torch's reference results) are made there."""
    if not gpu_only(name):
        yield name
        return
    torch.set_default_device("cuda")
    try:
        yield name
    finally:
        torch.set_default_device(None)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    yield from _on_its_device(request.param)


@pytest.fixture(params=FUSED or [pytest.param("none", marks=pytest.mark.skip("no fused backend built"))])
def fused(request):
    yield from _on_its_device(request.param)


@pytest.fixture
def seed():
    """A fresh seed per test (printed on failure through the test id's report)."""
    s = (
        random.SystemRandom().randrange(2**31)
        if os.environ.get("FASTCLIP_TEST_SEED") is None
        else int(os.environ["FASTCLIP_TEST_SEED"])
    )
    torch.manual_seed(s)
    print(f"seed={s}")
    return s
