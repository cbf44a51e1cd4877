"""torch.compile of the methods beyond torch's four: each compiles with
fullgraph=True through the generic custom ops (fastclip::method_ writes the
grads, fastclip::method reads them) and equals eager, bit for bit."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
import fastclip
from fastclip import _ops

from .helpers import FUSED, assert_bitwise_equal, clone_params, interpreted
from .method_refs import random_params
from .test_compile import _compiled, _fresh_dynamo  # noqa: F401 - the autouse fixture too
from .test_compile import _fastclip_ops as _ops_in


def _params(backend):
    shapes = [(6, 9), (5,), (3, 2, 2)] if interpreted(backend) else [(64, 33), (129,), (8, 4, 3, 3)]
    return random_params(shapes, [torch.float32, torch.bfloat16], scale=0.3)


@pytest.mark.parametrize("fused", FUSED)
def test_every_method_in_one_graph_equals_eager(fused, seed):
    params = _params(fused)
    eager = clone_params(params)

    def step(ps):
        per_tensor = fastclip.clip_grad_norm_per_tensor_(ps, [0.5, 0.1, 2.0], backend=fused)
        groups = fastclip.clip_grad_norm_groups_({"a": ps[:1], "b": ps[1:]}, 0.3, backend=fused)
        fastclip.clip_grad_range_(ps, -0.05, None, backend=fused)
        fastclip.adaptive_clip_grad_(ps, 0.02, backend=fused)
        return per_tensor, groups, *fastclip.grad_stats(ps, backend=fused)

    fn, counter = _compiled(step)
    got = fn(params)
    want = step(eager)
    assert counter.frame_count == 1
    assert _ops_in(counter) == ["fastclip.method_"] * 4 + ["fastclip.method"]
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b)
    for p, q in zip(params, eager):
        assert_bitwise_equal(p.grad, q.grad)


def test_per_tensor_max_norm_as_a_tensor_and_other_norm_types_trace(seed):
    params = _params("cpu")
    eager = clone_params(params)

    def step(ps):
        a = fastclip.clip_grad_norm_per_tensor_(ps, torch.tensor([0.5, 0.1, 2.0]))
        b = fastclip.clip_grad_norm_per_tensor_(ps, 0.2, norm_type=3.0)  # torch's path, traced
        return a, b

    fn, counter = _compiled(step)
    got, want = fn(params), step(eager)
    assert counter.frame_count == 1
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b)
    for p, q in zip(params, eager):
        assert_bitwise_equal(p.grad, q.grad)


def test_inductor_update_with_agc_and_stats(seed):
    """Inductor around the ops: the grads come from eager backward passes (so
    that Inductor's own backward kernels do not change their bits)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())

    def update(params):
        fastclip.adaptive_clip_grad_(params, 0.01)
        stats = fastclip.grad_stats(params)
        with torch.no_grad():
            for p in params:
                p.sub_(0.1 * p.grad)
        return stats.total_norm

    compiled = torch.compile(update, backend="inductor", fullgraph=True)
    for _ in range(3):
        x = torch.randn(8, 16)
        for net in (model, twin):
            net.zero_grad()
            (net(x) * 10).square().mean().backward()
        assert_bitwise_equal(compiled(list(model.parameters())), update(list(twin.parameters())))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # Inductor's fused update may round differently


def test_inductor_runs_the_fused_agc_on_parameters(seed):
    """The op is handed the nn.Parameters themselves as weights: still the
    fused kernels, so the same bits as eager."""
    params = _params("cpu")
    eager = clone_params(params)
    clip = lambda ps: fastclip.adaptive_clip_grad_(ps, 0.02, backend="cpu")  # noqa: E731
    torch.compile(clip, backend="inductor", fullgraph=True)(params)
    clip(eager)
    for p, q in zip(params, eager):
        assert_bitwise_equal(p.grad, q.grad)


def test_inductor_agc_on_views_of_one_grad_buffer(seed):
    """Grads that are views of one flat buffer (DDP's bucket views) take
    timm's code, traced: Inductor cannot decompose the op on them."""
    shapes = [(8, 5), (7,), (3, 4)]

    def make():
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        buffer, start = torch.randn(sum(torch.Size(s).numel() for s in shapes)) * 3, 0
        for p in params:
            p.grad = buffer[start : start + p.numel()].view(p.shape)
            start += p.numel()
        return params

    params, eager = make(), make()
    clip = lambda ps: fastclip.adaptive_clip_grad_(ps, 0.01)  # noqa: E731
    torch.compile(clip, backend="inductor", fullgraph=True)(params)
    clip(eager)
    for p, q in zip(params, eager):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_no_grads_compile_to_what_eager_returns(compiler):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    calls = {
        "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 1.0),
        "per_tensor": lambda ps: fastclip.clip_grad_norm_per_tensor_(ps, 1.0),
        "groups": lambda ps: fastclip.clip_grad_norm_groups_([ps[:1], ps[1:]], 1.0),
        "stats": lambda ps: tuple(fastclip.grad_stats(ps)),
        "agc": lambda ps: fastclip.adaptive_clip_grad_(ps, 0.01),
    }
    for name, call in calls.items():
        torch._dynamo.reset()
        got, want = torch.compile(call, backend=compiler, fullgraph=True)(params), call(params)
        got, want = (x if isinstance(x, tuple) else (x,) for x in (got, want))
        assert len(got) == len(want), name
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b), name


def test_groups_with_a_0_dim_max_norm_compile(seed):
    params = _params("cpu")
    eager = clone_params(params)
    step = lambda ps: fastclip.clip_grad_norm_groups_([ps[:1], ps[1:]], torch.tensor(0.3))  # noqa: E731
    fn, counter = _compiled(step)
    assert_bitwise_equal(fn(params), step(eager))
    for p, q in zip(params, eager):
        assert_bitwise_equal(p.grad, q.grad)


def test_generic_ops_pass_opcheck(seed):
    grads = [torch.randn(7, 3), torch.randn(5)]
    weights = [torch.randn(7, 3), torch.randn(5)]
    ops = torch.ops.fastclip
    torch.library.opcheck(ops.method_.default, ("per_tensor", [g.clone() for g in grads], [], [2.0, 0.0, 0.5], [],
                                                None, ""))  # fmt: skip
    torch.library.opcheck(ops.method_.default, ("groups", [g.clone() for g in grads], [], [2.0, 0.0, 0.5], [1, 1],
                                                None, ""))  # fmt: skip
    torch.library.opcheck(ops.method_.default, ("range", [g.clone() for g in grads], [], [-0.1, 0.1], [], None, ""))
    torch.library.opcheck(ops.method_.default, ("agc", [g.clone() for g in grads], weights, [0.01, 1e-3, 2.0], [],
                                                None, ""))  # fmt: skip
    torch.library.opcheck(ops.method.default, ("stats", grads, [2.0], ""))


def test_ops_module_imports_none_of_the_functions_it_runs():
    """The eager code behind the ops is registered with _ops (no import of _api
    or the methods from _ops: no import circle)."""
    tree = ast.parse(inspect.getsource(_ops))
    imported = {
        (node.module or "") + ":" + ",".join(a.name for a in node.names)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not any("_api" in i or "methods" in i for i in imported), imported
    for name in ("clip_grad_norm_", "per_tensor", "groups", "range", "agc", "stats"):
        assert name in _ops._REGISTERED


def test_bounds_and_agc_numbers_that_change_between_calls_compile_again(seed):
    """A number argument is a constant of the graph: a new value recompiles
    (dynamo then offers it as a symbolic float, which the traced checks must
    take: math.isnan cannot) and still gives the eager bits, with fullgraph=True."""
    fn, counter = _compiled(lambda ps, lo: (fastclip.clip_grad_range_(ps, lo, 2.0), fastclip.adaptive_clip_grad_(ps, lo)))
    for lo in (1.0, 0.5, 0.25):
        params = _params("cpu")
        eager = clone_params(params)
        fn(params, lo)
        fastclip.clip_grad_range_(eager, lo, 2.0)
        fastclip.adaptive_clip_grad_(eager, lo)
        for p, q in zip(params, eager):
            assert_bitwise_equal(p.grad, q.grad)
    assert counter.frame_count >= 2


def test_a_max_norm_schedule_given_as_a_tensor_compiles_once(seed):
    """README: a changing Python max_norm recompiles per value (a custom op
    takes no symbolic float); as a 0-dim tensor it is a graph input (torch's
    own functions traced: one graph for every value)."""
    fn, counter = _compiled(lambda ps, mx: fastclip.clip_grad_norm_(ps, mx))
    for i in range(10):
        params = _params("cpu")
        eager = clone_params(params)
        got = fn(params, torch.tensor(0.05 + 0.05 * i))
        want = torch.nn.utils.clip_grad_norm_(eager, 0.05 + 0.05 * i)
        torch.testing.assert_close(got, want)
        for p, q in zip(params, eager):
            torch.testing.assert_close(p.grad, q.grad)
    assert counter.frame_count == 1
