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
from .test_compile import op_for


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
    assert _ops_in(counter) == [op_for("method_")] * 4 + [op_for("method")]
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
    carried = torch.tensor([-0.1, 0.1], dtype=torch.float64)  # (numbers Dynamo holds symbolically)
    torch.library.opcheck(ops.method_carried_.default,
                          ("range", [g.clone() for g in grads], [], [], [], None, "", carried))  # fmt: skip
    torch.library.opcheck(ops.method_carried.default, ("stats", grads, [], "", torch.tensor([2.0], dtype=torch.float64)))


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


CHANGING_NUMBER = {
    "per_tensor": lambda ps, x: fastclip.clip_grad_norm_per_tensor_(ps, x),
    "per_tensor, one per parameter": lambda ps, x: fastclip.clip_grad_norm_per_tensor_(ps, [x, 1.0, 2 * x]),
    "range": lambda ps, x: fastclip.clip_grad_range_(ps, x, 0.25),
    "range, upper only": lambda ps, x: fastclip.clip_grad_range_(ps, None, x),
    "agc clip_factor": lambda ps, x: fastclip.adaptive_clip_grad_(ps, x),
    "agc eps": lambda ps, x: fastclip.adaptive_clip_grad_(ps, 0.05, eps=x),
    "groups": lambda ps, x: fastclip.clip_grad_norm_groups_({"a": ps[:1], "b": ps[1:]}, x),
    "groups, one per group": lambda ps, x: fastclip.clip_grad_norm_groups_([ps[:1], ps[1:]], [x, 1.0]),
}


@pytest.mark.parametrize("name", list(CHANGING_NUMBER))
def test_a_number_that_changes_between_calls_compiles_twice(name, seed):
    """A Python number (max_norm, a bound, clip_factor, eps) is a constant of
    the first graph; the next value compiles once more with it symbolic, carried
    to the op in a host tensor, and that graph serves every later value: ten
    values with fullgraph=True, each the eager bits (among them 0.0 and then
    -0.0, which clamp tells apart: Dynamo's guard on a constant would not)."""
    fn = CHANGING_NUMBER[name]
    compiled, counter = _compiled(fn)
    params = _params("cpu")
    eager = clone_params(params)
    for x in (0.3, 0.05, 0.0, -0.0, 0.15, 0.2, 0.01, 0.35, 0.4, 0.45):
        for p, q in zip(params, eager):
            p.grad = (torch.randn(p.shape, dtype=torch.float64) * 0.3).to(p.dtype)
            q.grad = p.grad.clone()
        got = compiled(params, x)
        want = fn(eager, x)
        for p, q in zip(params, eager):
            assert_bitwise_equal(p.grad, q.grad)
        assert (got is None and want is None) or torch.equal(got, want)
    # (every method here writes the grads) the second graph's op: the twin that takes carried numbers
    assert counter.frame_count == 2 and _ops_in(counter) == [op_for("method_"), op_for("method_", symbolic=True)]


def test_a_max_norm_schedule_given_as_a_tensor_compiles_once(seed):
    """A max_norm given as a 0-dim tensor is a graph input (torch's own
    functions traced): one graph for every value, from the first call."""
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
