"""Backend selection, the public surface, `python -m fastclip info`, and the
fallback when the compiled extension is missing."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
import warnings

import pytest
import torch

import fastclip
from fastclip import _dispatch
from fastclip.backends import torch_ref

from .helpers import assert_grads_bitwise_equal, clone_params, make_params

PUBLIC = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_norm"]


@pytest.mark.parametrize("name", PUBLIC)
def test_signatures_are_torchs_plus_keyword_only_extras(name):
    ours = inspect.signature(getattr(fastclip, name)).parameters
    theirs = inspect.signature(getattr(torch_ref, name, None) or getattr(torch.nn.utils, name)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for key, param in theirs.items():
        assert ours[key].default == param.default and ours[key].kind == param.kind, key
    norms = name in ("clip_grad_norm_", "get_total_norm", "clip_grad_norm")
    assert list(ours)[len(theirs) :] == (["backend", "process_group"] if norms else ["backend"])
    for extra in list(ours)[len(theirs) :]:
        assert ours[extra].kind is inspect.Parameter.KEYWORD_ONLY and ours[extra].default is None


def test_available_backends_and_info():
    names = fastclip.available_backends()
    assert names[-1] == "torch" and "cpu" in names
    info = fastclip.backend_info()
    assert set(info) == {"cpu", "triton", "cuda", "torch"}
    for status in info.values():
        assert {"built", "available", "reason", "version"} <= set(status)
        assert status["available"] == (status["reason"] == "")
    assert info["cpu"]["built"] and info["cpu"]["isa"] in info["cpu"]["isas"]
    # cuda: built wherever nvcc was found (tests/test_cuda_backend.py), usable with a GPU,
    # or on CPU tensors in its emulation (FASTCLIP_CUDA_EMULATE=1, set by conftest without a GPU)
    emulated = info["cuda"].get("mode", "").startswith("emulator")
    assert info["cuda"]["available"] == emulated or (info["cuda"]["built"] and torch.cuda.is_available())
    # triton: usable with a GPU, or on CPU tensors under TRITON_INTERPRET=1 (set by conftest without a GPU)
    assert info["triton"]["available"] == (info["triton"]["version"] is not None)
    assert ("triton" in names) == info["triton"]["available"]
    assert fastclip.BACKEND_NAMES == ("auto", "cpu", "cuda", "triton", "torch")


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "fastclip", "info"], capture_output=True, text=True, check=True).stdout
    assert "cpu" in out and "torch" in out and "triton" in out and "cuda" in out
    assert "auto on CPU tensors uses: cpu" in out


class _Spy:
    def __init__(self, monkeypatch, name):
        self.calls = 0
        original = getattr(torch_ref, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch_ref, name, spy)


def test_env_var_sets_the_default_backend(monkeypatch, seed):
    spy = _Spy(monkeypatch, "clip_grad_norm_")
    params = make_params([(4, 4)])
    monkeypatch.setenv("FASTCLIP_BACKEND", "torch")
    fastclip.clip_grad_norm_(params, 1.0)
    assert spy.calls == 1
    fastclip.clip_grad_norm_(params, 1.0, backend="cpu")  # an explicit argument wins
    assert spy.calls == 1
    monkeypatch.setenv("FASTCLIP_BACKEND", "auto")
    fastclip.clip_grad_norm_(params, 1.0)
    assert spy.calls == 1


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown fastclip backend 'gpu'"):
        fastclip.clip_grad_norm_([], 1.0, backend="gpu")
    monkeypatch.setenv("FASTCLIP_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTCLIP_BACKEND"):
        fastclip.clip_grad_value_([], 1.0)


@pytest.mark.parametrize("name", sorted(_dispatch.FUSED_BACKENDS))
def test_unavailable_backends_raise_a_clear_error(name, seed, monkeypatch):
    """Each fused backend made unavailable (here every one is available: the
    Triton and CUDA kernels run in the interpreter and the emulation)."""
    if fastclip.backend_info()[name]["available"]:
        backend = _dispatch.FUSED_BACKENDS[name]
        monkeypatch.setattr(type(backend), "available", property(lambda self: False))
        monkeypatch.setattr(type(backend), "status", lambda self: {"available": False, "reason": "made so (test)"})
    params = make_params([(3,)])
    before = params[0].grad.clone()
    for call in (
        lambda: fastclip.clip_grad_norm_(params, 1.0, backend=name),
        lambda: fastclip.clip_grad_value_(params, 1.0, backend=name),
        lambda: fastclip.get_total_norm([params[0].grad], backend=name),
        lambda: fastclip.clip_grads_with_norm_(params, 1.0, torch.tensor(5.0), backend=name),
    ):
        with pytest.raises(fastclip.BackendError, match=f"'{name}' is not available"):
            call()
    assert torch.equal(params[0].grad, before)


def test_auto_uses_the_cpu_backend_for_cpu_grads(monkeypatch, seed):
    spy = _Spy(monkeypatch, "clip_grad_norm_")
    fastclip.clip_grad_norm_(make_params([(3, 3)]), 1.0)
    assert spy.calls == 0


def test_norm_types_without_a_fused_kernel_go_to_torch_even_with_a_named_backend(monkeypatch, seed):
    spy = _Spy(monkeypatch, "clip_grad_norm_")
    fastclip.clip_grad_norm_(make_params([(3, 3)]), 1.0, norm_type=3.0, backend="cpu")
    assert spy.calls == 1


def test_missing_extension_falls_back_to_torch_and_warns_once(monkeypatch, seed):
    for backend in _dispatch.FUSED_BACKENDS.values():  # the Triton backend needs the extension's table too
        monkeypatch.setattr(type(backend), "available", property(lambda self: False))
        monkeypatch.setattr(
            type(backend),
            "status",
            lambda self: {
                "built": False,
                "available": False,
                "reason": "fastclip._cpu could not be loaded (test)",
                "version": None,
            },
        )
    monkeypatch.setattr(_dispatch, "_warned_device_types", set())
    params = make_params([(5, 5)])
    ref = clone_params(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = fastclip.clip_grad_norm_(params, 0.5)
        fastclip.clip_grad_norm_(params, 0.5)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "falling back to torch.nn.utils" in str(caught[0].message)
    assert torch.equal(total, ref_total)
    assert_grads_bitwise_equal(params, ref)
    assert fastclip.available_backends() == ["torch"]
    with pytest.raises(fastclip.BackendError, match="could not be loaded"):
        fastclip.clip_grad_norm_(params, 0.5, backend="cpu")


def test_gpu_grads_without_an_available_fused_backend_warn_once(monkeypatch):
    # CUDA grads where neither the CUDA nor the Triton backend can run at all
    # (say, neither built nor installed): "auto" gives them to torch, and says so once.
    monkeypatch.setattr(_dispatch, "_warned_device_types", set())
    for name in ("cuda", "triton"):
        monkeypatch.setattr(type(_dispatch.FUSED_BACKENDS[name]), "available", property(lambda self: False))
    grads = types.SimpleNamespace(device=torch.device("cuda", 0))  # select() reads only the device here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _dispatch.select("auto", grads, "") is None
        assert _dispatch.select("auto", grads, "") is None
    assert [w.category for w in caught] == [RuntimeWarning]
    message = str(caught[0].message)
    assert "no fused backend for cuda grads" in message and "cuda: " in message and "triton: " in message


def test_an_available_backend_that_declines_a_call_does_not_warn(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned_device_types", set())
    for name in ("cuda", "triton"):  # both available (as on a GPU machine), neither takes this call
        backend = type(_dispatch.FUSED_BACKENDS[name])
        monkeypatch.setattr(backend, "available", property(lambda self: True))
        monkeypatch.setattr(backend, "serves", lambda self, grads: False)
    grads = types.SimpleNamespace(device=torch.device("cuda", 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _dispatch.select("auto", grads, "") is None
    assert caught == []


def test_package_imports_without_the_extension():
    # a fresh interpreter in which importing fastclip._cpu fails
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name.endswith('_cpu') or (a and a[2] and '_cpu' in a[2]):\n"
        "        raise ImportError('simulated: not built')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "import warnings, torch, fastclip\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    t = fastclip.clip_grad_norm_([p], 1.0)\n"
        "print(fastclip.available_backends(), len(w), round(t.item(), 4))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["['torch']", "1", "1.7321"]


def test_torch_backend_compat_versions_match_torch(seed):
    """The stand-ins used on torch < 2.6 give torch's results here."""
    params = make_params([(4, 4), (0,), (3,)])
    grads = [p.grad for p in params]
    for norm_type in (2.0, 1, "inf", 0.5, 0):
        for foreach in (None, False, True):
            try:
                want = torch.nn.utils.get_total_norm(grads, norm_type, False, foreach)
            except RuntimeError as exc:
                with pytest.raises(RuntimeError, match=str(exc)[:30]):
                    torch_ref._compat_get_total_norm(grads, norm_type, False, foreach)
                continue
            assert torch.equal(torch_ref._compat_get_total_norm(grads, norm_type, False, foreach), want)
    nan_grads = [torch.tensor([float("nan")])]
    with pytest.raises(RuntimeError, match="non-finite"):
        torch_ref._compat_get_total_norm(nan_grads, 2.0, True)
    for foreach in (None, False, True):
        a, b = clone_params(params), clone_params(params)
        torch_ref._compat_clip_grads_with_norm_(a, 1.0, torch.tensor(10.0), foreach)
        torch.nn.utils.clip_grads_with_norm_(b, 1.0, torch.tensor(10.0), foreach)
        assert_grads_bitwise_equal(a, b)
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    meta.grad = torch.zeros(2, device="meta")
    with pytest.raises(RuntimeError, match="foreach=True"):
        torch_ref._compat_clip_grads_with_norm_([meta], 1.0, torch.tensor(1.0, device="meta"), True)
