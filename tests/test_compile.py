"""torch.compile: fastclip's functions compile with fullgraph=True (no graph
break) as torch custom ops, and compiled results equal eager ones bit for bit.

Most tests use the aot_eager backend (Dynamo + AOTAutograd, fast to
compile); one runs Inductor on a whole training step.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastclip
from fastclip import _ops

from .helpers import FUSED, assert_grads_bitwise_equal, clone_params, interpreted, make_params

SHAPES = [(33, 7), (1,), (0,), (129,), (4, 5, 6)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, backend="aot_eager"):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def _recognises_constants() -> bool:
    """Can _ops tell a constant number from one Dynamo holds symbolically on
    this torch?  torch 2.13's Dynamo resolves a constant's __class__; 2.11's
    does not, so there every number is carried (the same results; the op is
    the twin in every graph, left out of CUDA graphs)."""
    torch._dynamo.reset()
    probe = torch.compile(lambda t, x: (t + 1, _ops._symbolic(x)), backend="eager", fullgraph=True)
    symbolic = probe(torch.zeros(1), 0.5)[1]
    torch._dynamo.reset()
    return not symbolic


RECOGNISES_CONSTANTS = _recognises_constants()


def op_for(name: str, symbolic: bool = False) -> str:
    """The op a compiled call of `name` reaches: its twin for carried numbers
    when a number is symbolic, or always where constants are not recognised."""
    return f"fastclip.{_ops.carried_name(name) if symbolic or not RECOGNISES_CONSTANTS else name}"


def _fastclip_ops(counter) -> list[str]:
    return [
        str(node.target)
        for graph in counter.graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("fastclip.")
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", FUSED)
def test_compiled_clip_grad_norm_equals_eager(fused, dtype):
    params = make_params(SHAPES if not interpreted(fused) else SHAPES[:3], dtype, scale=3.0)
    eager = clone_params(params)
    fn, counter = _compiled(lambda ps: fastclip.clip_grad_norm_(ps, 0.5, backend=fused))
    total = fn(params)
    expected = fastclip.clip_grad_norm_(eager, 0.5, backend=fused)
    assert counter.frame_count == 1 and _fastclip_ops(counter) == [op_for("clip_grad_norm_")]
    assert total.dtype == expected.dtype and torch.equal(total, expected)
    assert_grads_bitwise_equal(params, eager)


def test_every_function_in_one_graph():
    params = make_params([s for s in SHAPES if 0 not in s], scale=2.0)  # inf-norm: no empty grad
    eager = clone_params(params)

    def step(ps):
        norm = fastclip.get_total_norm([p.grad for p in ps if p.grad is not None], 1.0)
        fastclip.clip_grads_with_norm_(ps, 3.0, norm)
        fastclip.clip_grad_value_(ps, 0.05)
        return norm, fastclip.clip_grad_norm_(ps, 0.1, float("inf"))

    fn, counter = _compiled(step)
    got = fn(params)
    want = step(eager)
    assert counter.frame_count == 1
    assert _fastclip_ops(counter) == [
        "fastclip.get_total_norm", op_for("clip_grads_with_norm_"), op_for("clip_grad_value_"),
        op_for("clip_grad_norm_"),
    ]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert_grads_bitwise_equal(params, eager)


CHANGING_NUMBER = {
    "clip_grad_norm_": lambda ps, x: fastclip.clip_grad_norm_(ps, x),
    "clip_grads_with_norm_": lambda ps, x: fastclip.clip_grads_with_norm_(ps, x, torch.tensor(3.0)),
    "clip_grad_value_": lambda ps, x: fastclip.clip_grad_value_(ps, x),
}


@pytest.mark.parametrize("kind", [float, int])
@pytest.mark.parametrize("name", list(CHANGING_NUMBER))
def test_a_number_that_changes_between_calls_compiles_twice(name, kind, seed):
    """A Python max_norm (clip_value) is a constant of the first graph; the
    next value compiles once more with it symbolic (Dynamo's automatic
    dynamic), carried to the op in a host tensor, and that graph serves every
    later value: ten values, floats or ints, with fullgraph=True (one graph
    per value would raise past Dynamo's recompile limit of 8), each giving
    the eager bits."""
    fn = CHANGING_NUMBER[name]
    compiled, counter = _compiled(fn)
    params = make_params([s for s in SHAPES if 0 not in s])
    eager = clone_params(params)
    for i in range(10):
        for p, q in zip(params, eager):
            p.grad = torch.randn_like(p) * (i + 1) * (1 if kind is float else 10)
            q.grad = p.grad.clone()
        value = 0.05 * (i + 1) if kind is float else i + 1
        got = compiled(params, value)
        want = fn(eager, value)
        assert (got is None and want is None) or torch.equal(got, want)
        assert_grads_bitwise_equal(params, eager)
    # the second graph's op is the twin that takes carried numbers (kept out of CUDA graphs)
    assert counter.frame_count == 2 and _fastclip_ops(counter) == [op_for(name), op_for(name, symbolic=True)]


def test_patched_torch_call_compiles_to_fastclip():
    """Through patch(), torch's own name in a compiled step is the fastclip op,
    with a max_norm schedule too (two graphs for four values)."""
    params = make_params(SHAPES, scale=2.0)
    eager = clone_params(params)
    with fastclip.patched():
        fn, counter = _compiled(lambda ps, max_norm: torch.nn.utils.clip_grad_norm_(ps, max_norm))
        totals = [fn(params, max_norm) for max_norm in (0.5, 0.4, 0.3, 0.2)]
    assert _fastclip_ops(counter) == [op_for("clip_grad_norm_"), op_for("clip_grad_norm_", symbolic=True)]
    for total, max_norm in zip(totals, (0.5, 0.4, 0.3, 0.2)):
        assert torch.equal(total, fastclip.clip_grad_norm_(eager, max_norm))
    assert_grads_bitwise_equal(params, eager)


@pytest.mark.parametrize(
    "call",
    [
        lambda ps: fastclip.clip_grad_norm_(ps, 0.5, norm_type=3.0),  # p the kernels do not take
        lambda ps: fastclip.clip_grad_norm_(ps, torch.tensor(0.5)),  # a tensor max_norm
        lambda ps: fastclip.clip_grad_value_(ps, torch.tensor(0.1)),
    ],
    ids=["p=3", "tensor-max_norm", "tensor-clip_value"],
)
def test_what_the_op_does_not_take_is_traced_torch(call):
    """Eager fastclip hands these calls to torch.nn.utils; compiled, Dynamo
    traces torch's functions instead of calling the op."""
    params = make_params(SHAPES[:2] + SHAPES[3:], scale=2.0)
    eager = clone_params(params)
    fn, counter = _compiled(call)
    got = fn(params)
    want = call(eager)
    assert counter.frame_count == 1 and _fastclip_ops(counter) == []
    if got is not None:
        torch.testing.assert_close(got, want)
    for p, q in zip(params, eager):
        torch.testing.assert_close(p.grad, q.grad)


def test_error_if_nonfinite_raises_in_a_compiled_function():
    params = make_params([(10,)])
    params[0].grad[3] = float("nan")
    before = params[0].grad.clone()
    fn, _ = _compiled(lambda ps: fastclip.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True))
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        fn(params)
    assert torch.equal(params[0].grad.view(torch.int32), before.view(torch.int32))


def test_ops_pass_torch_library_opcheck():
    grads = [torch.randn(5, 3), torch.randn(17, dtype=torch.float64), torch.randn(0)]
    ops = torch.ops.fastclip
    torch.library.opcheck(ops.clip_grad_norm_.default, ([g.clone() for g in grads], 0.5, 2.0, False, None, ""))
    torch.library.opcheck(ops.get_total_norm.default, (grads, 1.0, False, None, ""))
    torch.library.opcheck(
        ops.clip_grads_with_norm_.default, ([g.clone() for g in grads], 0.5, torch.tensor(9.0), None, "")
    )
    torch.library.opcheck(ops.clip_grad_value_.default, ([g.clone() for g in grads], 0.1, None, ""))
    torch.library.opcheck(ops.clip_grad_norm_.default, ([], 0.5, 2.0, False, None, ""))
    carried = torch.tensor([0.25], dtype=torch.float64)  # (a number Dynamo holds symbolically)
    torch.library.opcheck(
        ops.clip_grad_norm_carried_.default, ([g.clone() for g in grads], 0.0, 2.0, False, None, "", carried)
    )
    torch.library.opcheck(
        ops.clip_grads_with_norm_carried_.default,
        ([g.clone() for g in grads], 0.0, torch.tensor(9.0), None, "", carried),
    )
    torch.library.opcheck(ops.clip_grad_value_carried_.default, ([g.clone() for g in grads], 0.0, None, "", carried))


@pytest.mark.parametrize("name", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_", "method_", "method"])
def test_only_the_ops_that_take_carried_numbers_are_kept_out_of_cuda_graphs(name):
    """A CUDA graph replays kernels without running the op's Python, which
    reads a carried number on the host: replayed, it would keep the recorded
    value.  So the twin that takes carried numbers is tagged cudagraph_unsafe
    (Inductor gives it a partition of its own, or takes no CUDA graph), and the
    plain op, whose numbers are constants of the graph, is not."""
    unsafe = _ops._CUDAGRAPH_UNSAFE
    if unsafe is None:
        pytest.skip("this torch has no cudagraph_unsafe tag, or its custom_op takes no tags")
    plain, twin = getattr(torch.ops.fastclip, name).default, getattr(torch.ops.fastclip, _ops.carried_name(name)).default
    assert unsafe in twin.tags and unsafe not in plain.tags
    assert str(twin._schema).split("(", 1)[1] == str(plain._schema).split("(", 1)[1]  # the same arguments
    from torch._inductor import utils as inductor_utils

    is_cudagraph_unsafe_fx_node = getattr(inductor_utils, "is_cudagraph_unsafe_fx_node", None)
    if is_cudagraph_unsafe_fx_node is None:
        pytest.skip("this torch's Inductor has no is_cudagraph_unsafe_fx_node")
    graph = torch.fx.Graph()
    assert is_cudagraph_unsafe_fx_node(graph.call_function(twin))
    assert not is_cudagraph_unsafe_fx_node(graph.call_function(plain))


@pytest.mark.parametrize("schedule", [False, True])
def test_inductor_training_step_equals_eager(schedule):
    """A whole step (forward, backward outside, then clip and an SGD update
    compiled by Inductor) gives the parameters of the eager step, bit for bit;
    with a max_norm that changes every step, in two graphs (the second takes
    it symbolically, through Inductor's host kernel that carries it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())

    def update(params, max_norm):
        total = fastclip.clip_grad_norm_(params, max_norm)
        with torch.no_grad():
            for p in params:
                p.sub_(0.5 * p.grad)
        return total

    compiled, counter = _compiled(update, backend="inductor")
    for step in range(4):
        max_norm = 0.1 * (step + 1) if schedule else 0.1
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        for net in (model, twin):
            net.zero_grad()
            net(x).square().sum().backward()
        got = compiled(list(model.parameters()), max_norm)
        want = update(list(twin.parameters()), max_norm)
        assert torch.equal(got, want)
    ops = [op_for("clip_grad_norm_")] + ([op_for("clip_grad_norm_", symbolic=True)] if schedule else [])
    assert counter.frame_count == len(ops) and _fastclip_ops(counter) == ops
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_inductor_clips_the_grads_in_place_without_copies():
    """Inductor calls the mutating op on the grads' own buffers: no clone of
    the grads before it and no copy back after it (functionalization undone)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (64, 300, 7)]
    for p in params:
        p.grad = torch.randn_like(p)
    want = clone_params(params)
    want_total = torch.nn.utils.clip_grad_norm_(want, 0.5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda ps: fastclip.clip_grad_norm_(ps, 0.5), backend="inductor", fullgraph=True)
    total, (code,) = run_and_get_code(compiled, params)
    torch.testing.assert_close(total, want_total)
    for p, q in zip(params, want):
        torch.testing.assert_close(p.grad, q.grad)
    call = code[code.index("def call(") :]
    assert "torch.ops.fastclip.clip_grad_norm_" in call
    assert "clone" not in call and "copy_" not in call, call


def test_complex_grads_are_traced_torch():
    """Complex grads are not the kernels' dtypes: traced torch (the op's fake
    implementation would not describe torch's real-valued norm)."""
    grads = [torch.randn(6, dtype=torch.complex64), torch.randn(3, dtype=torch.complex64)]
    fn, counter = _compiled(lambda ts: fastclip.get_total_norm(ts))
    got = fn(grads)
    assert _fastclip_ops(counter) == [] and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.nn.utils.get_total_norm(grads))


def test_importing_fastclip_does_not_load_dynamo():
    """Registering the ops must not pull in torch._dynamo (about 2 s of import)."""
    import subprocess
    import sys

    code = "import sys, fastclip; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False"
