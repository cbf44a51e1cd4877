"""Every entry point runs without autograd, as torch's clip functions do: a
max_norm, bound or total_norm tensor that requires grad changes nothing (no
graph on the grads, no refusal to write a leaf), on every backend; and every
torch op an entry point runs on the grads runs with grad mode off.  (For
clip_grad_norm_ and clip_grads_with_norm_ torch's own functions, which
fastclip's torch paths call, turn it off too.)"""

from __future__ import annotations

import pytest
import torch

import fastclip

from .helpers import assert_bitwise_equal, clone_params


def _params(views_of_one_buffer: bool, seed: int):
    """Three parameters whose grads (2x3, 4, 3x2: some clip) are separate
    tensors or views of one flat buffer (as DDP's bucket views are)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 3), (4,), (3, 2)]
    flat = torch.randn(16, generator=gen) * torch.tensor([3.0] * 6 + [0.1] * 4 + [2.0] * 6)
    params, start = [], 0
    for shape in shapes:
        n = torch.Size(shape).numel()
        p = torch.nn.Parameter(torch.zeros(shape))
        view = flat[start : start + n].view(shape)
        p.grad = view if views_of_one_buffer else view.clone()
        params.append(p)
        start += n
    return params


def _needing_grad(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, requires_grad=True)


CALLS = {
    "clip_grad_norm_": lambda ps, b, t: fastclip.clip_grad_norm_(ps, t(1.0), backend=b),
    "clip_grads_with_norm_": lambda ps, b, t: fastclip.clip_grads_with_norm_(ps, 1.0, t(5.0), backend=b),
    "get_total_norm of the parameters": lambda ps, b, t: fastclip.get_total_norm(ps, backend=b),
    "clip_grad_norm_per_tensor_": lambda ps, b, t: fastclip.clip_grad_norm_per_tensor_(
        ps, t([0.5, 1.0, 2.0]), backend=b
    ),
    "clip_grad_norm_groups_": lambda ps, b, t: fastclip.clip_grad_norm_groups_(
        [ps[:1], ps[1:]], t([0.5, 1.0]), backend=b
    ),
    "clip_grad_range_": lambda ps, b, t: fastclip.clip_grad_range_(ps, t(-1.0), t(0.5), backend=b),
}


@pytest.mark.parametrize("views", [False, True], ids=["separate", "views"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_tensor_argument_that_requires_grad_records_nothing(backend, seed, name, views):
    params = _params(views, seed)
    plain = clone_params(params)
    ours = CALLS[name](params, backend, _needing_grad)
    want = CALLS[name](plain, backend, lambda v: torch.tensor(v, dtype=torch.float32))
    for p, q in zip(params, plain):
        assert not p.grad.requires_grad and p.grad.grad_fn is None
        assert_bitwise_equal(p.grad, q.grad)
    if isinstance(ours, torch.Tensor):
        assert not ours.requires_grad
        assert_bitwise_equal(ours, want)


def test_grads_that_require_grad_are_written_without_a_graph(backend, seed):
    """create_graph=True leaves grads that require grad; torch's clip writes
    them under no_grad, leaving no grad_fn behind, and so does fastclip."""
    params = _params(False, seed)
    for p in params:
        p.grad.requires_grad_(True)
    plain = clone_params(params)
    fastclip.clip_grad_norm_per_tensor_(params, 0.5, backend=backend)
    for q in plain:
        torch.nn.utils.clip_grad_norm_([q], 0.5)
    for p, q in zip(params, plain):
        assert p.grad.grad_fn is None
        torch.testing.assert_close(p.grad.detach(), q.grad.detach())


class _Recording(torch.Tensor):
    """A grad that records the grad mode of every torch op run on it (such
    grads take the plain-torch paths, the ones autograd could see)."""

    modes: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.modes.append(torch.is_grad_enabled())
        return super().__torch_function__(func, types, args, kwargs or {})


ENTRY_POINTS = {
    "clip_grad_norm_per_tensor_": lambda ps: fastclip.clip_grad_norm_per_tensor_(ps, 0.5),
    "clip_grad_norm_groups_": lambda ps: fastclip.clip_grad_norm_groups_([ps[:1], ps[1:]], 0.5),
    "clip_grad_range_": lambda ps: fastclip.clip_grad_range_(ps, -0.1, 0.1),
    "adaptive_clip_grad_": lambda ps: fastclip.adaptive_clip_grad_(ps, 0.01),
    "grad_stats": lambda ps: fastclip.grad_stats(ps),
    "ZClip.step": lambda ps: fastclip.ZClip(warmup_steps=1).step(ps),
    "QuantileClip.step": lambda ps: fastclip.QuantileClip(ps).step(),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_op_of_an_entry_point_runs_with_grad_mode_off(name, seed):
    params = _params(False, seed)
    for p in params:
        p.grad = p.grad.as_subclass(_Recording)
    _Recording.modes = []
    ENTRY_POINTS[name](params)
    assert _Recording.modes and not any(_Recording.modes)
