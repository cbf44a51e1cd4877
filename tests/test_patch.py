"""fastclip.patch() / unpatch() / patched(): torch.nn.utils' clipping
functions point at fastclip, idempotently and reversibly, and frameworks that
call torch (Lightning here) then clip with fastclip."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.utils.clip_grad as clip_grad_module

import fastclip
from fastclip import _api
from fastclip._dispatch import FUSED_BACKENDS

from .helpers import clone_params, count_calls, make_params

NAMES = {
    torch.nn.utils: [
        "clip_grad_norm_",
        "clip_grad_norm",
        "clip_grad_value_",
        "get_total_norm",
        "clip_grads_with_norm_",
    ],
    clip_grad_module: ["clip_grad_norm_", "clip_grad_norm", "clip_grad_value_"],
}


def _snapshot():
    return {(m, n): getattr(m, n) for m, names in NAMES.items() for n in names}


@pytest.fixture(autouse=True)
def _restore_torch():
    before = _snapshot()
    yield
    fastclip.unpatch()
    for (module, name), fn in before.items():
        setattr(module, name, fn)


def test_patch_points_every_name_at_fastclip_and_unpatch_restores():
    originals = _snapshot()
    assert not fastclip.is_patched()
    assert fastclip.patch() is True
    assert fastclip.is_patched()
    for module, name in originals:
        assert getattr(module, name) is getattr(_api, name), (module.__name__, name)
    assert fastclip.patch() is False  # idempotent
    assert fastclip.unpatch() is True
    assert _snapshot() == originals and not fastclip.is_patched()
    assert fastclip.unpatch() is False


def test_patched_context_manager_nests():
    originals = _snapshot()
    with fastclip.patched():
        assert fastclip.is_patched()
        with fastclip.patched():
            assert fastclip.is_patched()
        assert fastclip.is_patched()  # the inner block did not patch, so it does not unpatch
    assert _snapshot() == originals
    fastclip.patch()
    with fastclip.patched():
        pass
    assert fastclip.is_patched()  # patched before the block: still patched after it


def test_patched_block_undoes_only_its_own_changes():
    fastclip.patch()

    def theirs(*args, **kwargs):
        return None

    torch.nn.utils.clip_grad_value_ = theirs  # replaced after our patch
    with fastclip.patched():
        assert fastclip.is_patched()
    assert torch.nn.utils.clip_grad_value_ is theirs  # as before the block
    assert torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_  # patch() still holds
    fastclip.unpatch()
    originals = _snapshot()
    with fastclip.patched():
        fastclip.patch()  # made permanent inside the block
    assert fastclip.is_patched()
    fastclip.unpatch()
    assert (
        not fastclip.is_patched() and torch.nn.utils.clip_grad_value_ is originals[(torch.nn.utils, "clip_grad_value_")]
    )


def test_unpatch_leaves_what_someone_else_put_there():
    fastclip.patch()

    def theirs(*args, **kwargs):
        return None

    torch.nn.utils.clip_grad_value_ = theirs
    fastclip.unpatch()
    assert torch.nn.utils.clip_grad_value_ is theirs
    assert torch.nn.utils.clip_grad_norm_ is not fastclip.clip_grad_norm_


def test_patched_torch_calls_run_the_fused_kernels(monkeypatch):
    calls = count_calls(monkeypatch, FUSED_BACKENDS["cpu"], "clip_norm")
    params = make_params([(40, 3), (7,)], scale=5.0)
    reference = clone_params(params)
    with fastclip.patched():
        total = torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.nn.utils.clip_grad.clip_grad_norm_(clone_params(params), 1.0)
    assert calls["clip_norm"] == 2
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(reference, 1.0))
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.grad, q.grad)


def test_fallbacks_still_reach_torchs_own_code_when_patched():
    """Calls fastclip hands to torch (here p=3) run torch's original functions,
    not the patched names (no recursion)."""
    params = make_params([(10,), (4, 4)])
    reference = clone_params(params)
    want = torch.nn.utils.clip_grad_norm_(reference, 0.1, 3.0)
    with fastclip.patched():
        got = torch.nn.utils.clip_grad_norm_(params, 0.1, 3.0)
        with pytest.warns(FutureWarning):
            torch.nn.utils.clip_grad_norm(clone_params(params), 0.1, 3.0)
    assert torch.equal(got, want)
    for p, q in zip(params, reference):
        assert torch.equal(p.grad, q.grad)


def test_lightning_trainer_clips_with_fastclip_when_patched(monkeypatch):
    pl = pytest.importorskip("pytorch_lightning")
    from examples.lightning_patch import TinyRegression, train

    calls = count_calls(monkeypatch, FUSED_BACKENDS["cpu"], "clip_norm", "clamp")
    torch_weights = train(steps=4, algorithm="norm", use_fastclip=False)
    assert calls["clip_norm"] == 0
    fast_weights = train(steps=4, algorithm="norm", use_fastclip=True)
    assert calls["clip_norm"] == 4
    for a, b in zip(torch_weights, fast_weights):
        torch.testing.assert_close(a, b)
    train(steps=3, algorithm="value", use_fastclip=True)
    assert calls["clamp"] == 3
    assert not fastclip.is_patched() and isinstance(TinyRegression(), pl.LightningModule)


def test_accelerate_clips_with_fastclip_when_patched(monkeypatch):
    """HF accelerate (what the HF Trainer calls): Accelerator.clip_grad_norm_ /
    clip_grad_value_ reach torch.nn.utils at call time, so fastclip when patched."""
    accelerate = pytest.importorskip("accelerate")

    # accelerate < 1.16 calls clip_grad_norm_ (the backend's clip_norm); 1.16
    # takes get_total_norm (norm), then clip_grads_with_norm_ (scale)
    calls = count_calls(monkeypatch, FUSED_BACKENDS["cpu"], "clip_norm", "norm", "scale", "clamp")

    def train(patch: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        accelerator = accelerate.Accelerator(cpu=True)
        model, opt = accelerator.prepare(model, opt)
        data = torch.Generator().manual_seed(1)
        norms = []
        with fastclip.patched() if patch else contextlib.nullcontext():
            for _ in range(3):
                x = torch.randn(16, 6, generator=data)
                opt.zero_grad()
                accelerator.backward((model(x) * 40).square().mean())
                norms.append(accelerator.clip_grad_norm_(model.parameters(), 0.5))
                accelerator.clip_grad_value_(model.parameters(), 0.01)
                opt.step()
        return norms, [p.detach().clone() for p in model.parameters()]

    torch_norms, torch_weights = train(patch=False)
    assert calls == {"clip_norm": 0, "norm": 0, "scale": 0, "clamp": 0}
    fast_norms, fast_weights = train(patch=True)
    assert calls["clip_norm"] + calls["norm"] == 3 and calls["clamp"] == 3
    assert calls["clip_norm"] == 3 or calls["scale"] == 3  # every step clips
    torch.testing.assert_close(torch.stack(fast_norms), torch.stack(torch_norms))
    for a, b in zip(fast_weights, torch_weights):
        torch.testing.assert_close(a, b)
