"""The contract of docs/torch-contract.md, against every backend.

Each test runs fastclip and torch.nn.utils on copies of the same grads.  On
the fused path fastclip's norm must be at least as accurate as torch's and
its grads bit-identical to what torch does with that norm; on the torch path
(backend="torch", or inputs fastclip hands to torch) everything is identical.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import fastclip

from .helpers import (
    FUSED,
    UNWRITABLE,
    assert_raises_leaving_grads,
    with_unwritable_grad,
    assert_bitwise_equal,
    assert_grads_bitwise_equal,
    assert_same_outcome,
    check_clip_grad_norm,
    check_total_norm,
    clone_params,
    grads_of,
    interpreted,
    is_fused,
    make_params,
    outcome,
)

FOREACH = [None, False, True]
INF = float("inf")
NAN = float("nan")


def linear_with_grads(big: bool):
    """torch's test_clip_grad_norm fixture: nn.Linear(10, 10) with chosen grads."""
    layer = torch.nn.Linear(10, 10)
    if big:
        layer.weight.grad = torch.arange(1.0, 101).view(10, 10)
        layer.bias.grad = torch.ones(10).div(1000)
    else:
        layer.weight.grad = torch.rand(10, 10).div(10000)
        layer.bias.grad = torch.ones(10).div(500)
    return list(layer.parameters())


# ---------------------------------------------------------------- torch's own tests


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_value_like_torch(backend, foreach, seed):
    layer = torch.nn.Linear(10, 10)
    for grad_list in ([[layer.weight, layer.bias]], [[layer.weight]]):
        params = grad_list[0]
        layer.weight.grad = torch.arange(-50.0, 50).view(10, 10).div_(5)
        layer.bias.grad = torch.ones(10).mul_(2)
        if len(params) == 1:
            layer.bias.grad = None
        ref = clone_params(params)
        fastclip.clip_grad_value_(params, 2.5, foreach=foreach, backend=backend)
        torch.nn.utils.clip_grad_value_(ref, 2.5, foreach=foreach)
        for p in params:
            assert p.grad.max() <= 2.5 and p.grad.min() >= -2.5
        assert_grads_bitwise_equal(params, ref)
    # a single Tensor and [Tensor] give the same grads
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    g = torch.arange(-50.0, 50).view(10, 10).div_(5)
    p1.grad, p2.grad = g.clone(), g.clone()
    fastclip.clip_grad_value_(p1, 2.5, foreach=foreach, backend=backend)
    fastclip.clip_grad_value_([p2], 2.5, foreach=foreach, backend=backend)
    assert_bitwise_equal(p1.grad, p2.grad)


@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_norm_like_torch(backend, norm_type, foreach, seed):
    max_norm = 2

    def expected_norm(params):
        if norm_type == "inf":
            return max(p.grad.abs().max().item() for p in params)
        return sum(p.grad.abs().pow(norm_type).sum().item() for p in params) ** (1.0 / norm_type)

    # large grads: clipped to max_norm, uniformly
    params = linear_with_grads(big=True)
    before = grads_of(params)
    want = expected_norm(params)
    total, ours = check_clip_grad_norm(params, backend, max_norm, norm_type, foreach)
    assert total.item() == pytest.approx(want, rel=1e-5)
    after = expected_norm(ours)
    assert after == pytest.approx(max_norm, rel=1e-5) and after <= total.item()
    ratios = torch.cat([(p.grad / g).view(-1) for p, g in zip(ours, before)])
    assert ratios.std().item() == pytest.approx(0, abs=1e-7)

    # the same through the decomposed API
    params2 = clone_params(params)
    grads = [p.grad for p in params2]
    total2 = fastclip.get_total_norm(grads, norm_type, foreach=foreach, backend=backend)
    fastclip.clip_grads_with_norm_(params2, max_norm, total2, foreach=foreach, backend=backend)
    assert_bitwise_equal(total2, total)
    assert_grads_bitwise_equal(params2, ours)

    # small grads: no clipping, scale exactly 1
    params = linear_with_grads(big=False)
    before = grads_of(params)
    total, ours = check_clip_grad_norm(params, backend, max_norm, norm_type, foreach)
    assert expected_norm(ours) == pytest.approx(total.item(), rel=1e-5)
    for p, g in zip(ours, before):
        assert_bitwise_equal(p.grad, g)

    # a single Tensor and [Tensor]
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    g = torch.arange(1.0, 101).view(10, 10)
    p1.grad, p2.grad = g.clone(), g.clone()
    fastclip.clip_grad_norm_(p1, max_norm, norm_type, foreach=foreach, backend=backend)
    fastclip.clip_grad_norm_([p2], max_norm, norm_type, foreach=foreach, backend=backend)
    assert_bitwise_equal(p1.grad, p2.grad)


def test_empty_generator_warns_once(backend):
    layer = torch.nn.Linear(3, 3)
    gen = layer.parameters()
    list(gen)  # exhausted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = fastclip.clip_grad_norm_(gen, 1.0, backend=backend)
    assert [str(w.message) for w in caught] == ["`parameters` is an empty generator, no gradient clipping will occur."]
    assert caught[0].filename == __file__  # points at the caller, as torch's does
    assert_bitwise_equal(total, torch.tensor(0.0))
    # an exhausted list or iterator that is not a generator: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastclip.clip_grad_norm_([], 1.0, backend=backend)
        fastclip.clip_grad_norm_(iter([]), 1.0, backend=backend)


def test_generator_is_consumed_once(backend, seed):
    params = make_params([(3, 4), (5,)])
    ref = clone_params(params)
    gen = (p for p in params)
    total = fastclip.clip_grad_norm_(gen, 0.1, backend=backend)
    ref_total = torch.nn.utils.clip_grad_norm_((p for p in ref), 0.1)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    assert all((p.grad.norm() < 0.1).item() for p in params)


# ---------------------------------------------------------------- return value


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32],
        [torch.float64],
        [torch.float16],
        [torch.bfloat16],
        [torch.float16, torch.bfloat16],
        [torch.float16, torch.float32, torch.bfloat16],
        [torch.float32, torch.float64],
        [torch.bfloat16, torch.float64, torch.float16],
    ],
)
def test_return_dtype_device_and_values(backend, dtypes, seed):
    params = [make_params([(7, 3)], dtype=d, scale=0.5)[0] for d in dtypes]
    for max_norm in (1e9, 0.5):
        check_clip_grad_norm(params, backend, max_norm)


def test_no_grads_returns_cpu_zero_in_default_dtype(backend):
    for params in ([], [torch.nn.Parameter(torch.ones(3))], [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]):
        total = fastclip.clip_grad_norm_(params, 1.0, backend=backend)
        assert_bitwise_equal(total, torch.tensor(0.0))
        assert total.device == torch.tensor(0.0).device  # the CPU (the default device: see conftest)
        assert_bitwise_equal(fastclip.get_total_norm([], backend=backend), torch.tensor(0.0))
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert fastclip.clip_grad_norm_([], 1.0, backend=backend).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)


def test_result_does_not_require_grad_with_create_graph_grads(backend, seed):
    w = torch.nn.Parameter(torch.randn(5, 5))
    loss = (w**3).sum()
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    w.grad = g
    assert w.grad.requires_grad
    ref = torch.nn.Parameter(w.detach().clone())
    ref.grad = g.detach().clone().requires_grad_()
    total = fastclip.clip_grad_norm_([w], 0.5, backend=backend)
    ref_total = torch.nn.utils.clip_grad_norm_([ref], 0.5)
    assert not total.requires_grad
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)


# ---------------------------------------------------------------- norm types


@pytest.mark.parametrize(
    "norm_type",
    [2, 2.0, 1, "1", "inf", "-inf", " inf ", "Infinity", INF, -INF, 0, 0.0, 0.5, 1.5, 3, 4, -1, -2, -3.5, NAN, "nan"],
)
def test_norm_types(backend, norm_type, seed):
    params = make_params([(4, 5), (7,), (1,)])
    params[0].grad[0, 0] = 0.0  # zeros matter for p=0 and negative p
    for max_norm in (1e6, 0.3):
        check_clip_grad_norm(params, backend, max_norm, norm_type)
        got = outcome(fastclip.get_total_norm, [p.grad for p in params], norm_type, backend=backend)
        want = outcome(torch.nn.utils.get_total_norm, [p.grad for p in params], norm_type)
        assert_same_outcome(got, want)


def test_p0_counts_tensors_with_a_nonzero_like_torch(backend):
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, 2.0])
    assert fastclip.get_total_norm([a.grad, b.grad], 0, backend=backend).item() == 2.0
    assert fastclip.clip_grad_norm_([a, b], 1e6, 0, backend=backend).item() == 2.0


@pytest.mark.parametrize("norm_type", ["fro", None, [1], "two"])
def test_bad_norm_type_raises_torchs_error(backend, norm_type, seed):
    params = make_params([(3,)])
    check_clip_grad_norm(params, backend, 1.0, norm_type)  # also checks the grads are untouched
    grads = [p.grad for p in params]
    assert_same_outcome(
        outcome(fastclip.get_total_norm, grads, norm_type, backend=backend),
        outcome(torch.nn.utils.get_total_norm, grads, norm_type),
    )
    assert_same_outcome(
        outcome(fastclip.clip_grad_norm_, [], 1.0, norm_type, backend=backend),
        outcome(torch.nn.utils.clip_grad_norm_, [], 1.0, norm_type),
    )


@pytest.mark.parametrize("foreach", FOREACH)
def test_inf_norm_of_empty_grad_raises_torchs_error(backend, foreach, seed):
    params = make_params([(3, 3), (0,), (2,)])
    for norm_type in ("inf", -INF):
        check_clip_grad_norm(params, backend, 1.0, norm_type, foreach)
    # p=2 with an empty grad is fine
    check_clip_grad_norm(params, backend, 0.5, 2.0, foreach)


# ---------------------------------------------------------------- non-finite values and max_norm


def test_nan_grad_makes_every_grad_nan(backend, seed):
    params = make_params([(3, 3), (4,)])
    params[1].grad[2] = NAN
    total, ours = check_clip_grad_norm(params, backend, 1.0)
    assert math.isnan(total.item())
    assert all(torch.isnan(p.grad).all() for p in ours)


def test_inf_grad_gives_nan_and_signed_zeros(backend):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([INF, 2.0, -3.0])
    total, ours = check_clip_grad_norm([p], backend, 1.0)
    assert total.item() == INF
    g = ours[0].grad
    assert math.isnan(g[0].item()) and g[1].item() == 0.0 and math.copysign(1, g[2].item()) == -1.0


@pytest.mark.parametrize("error_if_nonfinite", [False, True])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("norm_type", [1, 2, "inf"])
def test_error_if_nonfinite(backend, error_if_nonfinite, bad, norm_type, seed):
    params = make_params([(4, 4), (3,)], dtype=torch.float64)
    params[0].grad[1, 2] = bad
    check_clip_grad_norm(params, backend, 1.0, norm_type, error_if_nonfinite=error_if_nonfinite)
    got = outcome(fastclip.get_total_norm, [p.grad for p in params], norm_type, error_if_nonfinite, backend=backend)
    want = outcome(torch.nn.utils.get_total_norm, [p.grad for p in params], norm_type, error_if_nonfinite)
    assert_same_outcome(got, want)


@pytest.mark.parametrize("max_norm", [0.0, -0.0, -1.0, -1e-3, INF, -INF, NAN, 1e-30, 1e30, 3, torch.tensor(0.5)])
def test_max_norm_values(backend, max_norm, seed):
    params = make_params([(5, 5), (2,)])
    params[0].grad[0, 0] = -0.0
    check_clip_grad_norm(params, backend, max_norm)


def test_max_norm_inf_is_a_noop_even_for_zero_grads(backend):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([0.0, -0.0, 0.0, 0.0])
    before = p.grad.clone()
    fastclip.clip_grad_norm_([p], INF, backend=backend)
    assert_bitwise_equal(p.grad, before)


@pytest.mark.parametrize("max_norm", ["abc", None, [1.0]])
def test_bad_max_norm_raises_torchs_error_and_leaves_grads(backend, max_norm, seed):
    params = make_params([(3, 3)])
    check_clip_grad_norm(params, backend, max_norm)
    # with no grads torch still converts max_norm first
    assert_same_outcome(
        outcome(fastclip.clip_grad_norm_, [], max_norm, backend=backend),
        outcome(torch.nn.utils.clip_grad_norm_, [], max_norm),
    )


@pytest.mark.parametrize("which", ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_"])
def test_an_unwritable_grad_raises_torchs_error_before_any_write(backend, which, seed):
    """torch raises on reaching a grad its in-place ops cannot write (an
    expand()), after writing the grads before it; fastclip raises first."""
    params = with_unwritable_grad(make_params([(3, 3), (40,)], scale=10.0))
    call = {
        "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 0.1, backend=backend),
        "clip_grad_value_": lambda ps: fastclip.clip_grad_value_(ps, 0.1, backend=backend),
        "clip_grads_with_norm_": lambda ps: fastclip.clip_grads_with_norm_(ps, 0.1, torch.tensor(50.0), backend=backend),
    }[which]
    assert_raises_leaving_grads(call, params, RuntimeError, f"{UNWRITABLE}|cannot serve")


def test_with_an_unwritable_grad_torchs_argument_errors_come_first(backend):
    """torch checks max_norm, total_norm and clip_value before it meets a grad
    it cannot write (in its grouped clamp: the first grad of the overflowing
    group first); fastclip raises the same error, with nothing written."""
    cases = [  # (function name, arguments after the parameters, skip the plain grad)
        ("clip_grads_with_norm_", ("abc", torch.tensor(5.0)), False),
        ("clip_grads_with_norm_", (1.0, 5.0), False),  # a float total: torch's TypeError
        ("clip_grads_with_norm_", (1.0, torch.tensor([10.0, 20.0])), False),  # its multiply's error
        ("clip_grad_value_", (1e39,), False),  # the plain grad comes first: the overflow
        ("clip_grad_value_", (1e39,), True),  # the unwritable one alone: its own error
    ]
    for name, args, alone in cases:
        params = lambda: with_unwritable_grad(make_params([(3, 3)], scale=10.0))[1 if alone else 0 :]  # noqa: E731
        theirs = outcome(getattr(torch.nn.utils, name), params(), *args)
        assert theirs[0] == "raise"
        ours = lambda ps: getattr(fastclip, name)(ps, *args, backend=backend)  # noqa: E731,B023
        if backend in ("auto", "torch"):
            assert_raises_leaving_grads(ours, params(), theirs[1], re.escape(theirs[2][:60]))
        else:  # a named fused backend refuses such a grad
            assert_raises_leaving_grads(ours, params(), (theirs[1], fastclip.BackendError), "cannot serve")


def test_a_sparse_grad_beside_dense_ones_leaves_them_unclamped(backend):
    """torch's clip_grad_value_ clamps the dense grads, then raises on the sparse one; here nothing is written."""
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.tensor([5.0, -5.0, 0.5])
    sparse = torch.nn.Parameter(torch.zeros(5))
    sparse.grad = torch.tensor([0.0, 3.0, 0.0, 4.0, 0.0]).to_sparse()
    before = dense.grad.clone()
    with pytest.raises((NotImplementedError, RuntimeError)):
        fastclip.clip_grad_value_([dense, sparse], 1.0, backend=backend)
    assert_bitwise_equal(dense.grad, before)


def test_nonfinite_check_comes_before_max_norm_conversion(backend):
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([NAN, 1.0])
    check_clip_grad_norm([p], backend, "abc", error_if_nonfinite=True)


# ---------------------------------------------------------------- argument forms


def test_none_grads_are_skipped(backend, seed):
    params = make_params([(3, 3), (4,), (2, 2)])
    params[1].grad = None
    check_clip_grad_norm(params, backend, 0.5)


def test_plain_tensors_with_grad_work(backend, seed):
    ts = [torch.randn(4, 4), torch.randn(3)]
    for t in ts:
        t.grad = torch.randn(t.shape)
    check_clip_grad_norm(ts, backend, 0.5)


def test_named_parameters_raise_torchs_attribute_error(backend):
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.ones(2, 2)
    for fn, tfn, args in [
        (fastclip.clip_grad_norm_, torch.nn.utils.clip_grad_norm_, (1.0,)),
        (fastclip.clip_grad_value_, torch.nn.utils.clip_grad_value_, (1.0,)),
        (fastclip.clip_grads_with_norm_, torch.nn.utils.clip_grads_with_norm_, (1.0, torch.tensor(2.0))),
    ]:
        assert_same_outcome(
            outcome(fn, layer.named_parameters(), *args, backend=backend),
            outcome(tfn, layer.named_parameters(), *args),
        )


def test_duplicates_are_counted_and_scaled_twice(backend, seed):
    params = make_params([(6, 6), (3,)])
    ours, ref = clone_params(params), clone_params(params)
    total = fastclip.clip_grad_norm_([ours[0], ours[1], ours[0]], 0.1, backend=backend)
    ref_total = torch.nn.utils.clip_grad_norm_([ref[0], ref[1], ref[0]], 0.1)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    # scaled twice: each grad equals torch's twice-scaled result given our total
    expected = clone_params(params)
    torch.nn.utils.clip_grads_with_norm_([expected[0], expected[1], expected[0]], 0.1, total)
    assert_grads_bitwise_equal(ours, expected)


def test_large_duplicated_grad_is_scaled_twice_in_sequence(fused, seed):
    # Big enough for the threaded passes (CPU) or many programs (GPU): two
    # threads must not scale the same memory at once.
    n = 5_000 if interpreted(fused) else 3_000_000
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = torch.randn(n)
    ref = clone_params([p])[0]
    total = fastclip.clip_grad_norm_([p, p], 1.0, backend=fused)
    torch.nn.utils.clip_grads_with_norm_([ref, ref], 1.0, total)
    assert_bitwise_equal(p.grad, ref.grad)


def test_deprecated_alias_warns(backend, seed):
    params = make_params([(3,)])
    with pytest.warns(FutureWarning, match="deprecated"):
        total = fastclip.clip_grad_norm(params, 1.0, backend=backend)
    assert total.dim() == 0


# ---------------------------------------------------------------- layouts


def test_transposed_grads(backend, seed):
    params = make_params([(5, 7), (3, 4)])
    for p in params:
        p.grad = p.grad.t().contiguous().t()  # dense, not contiguous
        assert not p.grad.is_contiguous()
    check_clip_grad_norm(params, backend, 0.5)


def test_sliced_grads_touch_nothing_outside_the_view(backend, seed):
    base = torch.randn(6, 9)
    base_before = base.clone()
    rows = torch.randn(9, 3)
    rows_before = rows.clone()
    p, q = torch.nn.Parameter(torch.zeros(6, 4)), torch.nn.Parameter(torch.zeros(3, 3))
    p.grad, q.grad = base[:, 2:6], rows[::3]  # a column slice; rows with a stride
    assert not p.grad.is_contiguous() and not q.grad.is_contiguous()
    expected = clone_params([p, q])
    total, _ = check_clip_grad_norm([p, q], backend, 0.5)  # on copies
    fastclip.clip_grad_norm_([p, q], 0.5, backend=backend)  # in place, on the views
    assert torch.equal(base[:, :2], base_before[:, :2]) and torch.equal(base[:, 6:], base_before[:, 6:])
    assert torch.equal(rows[1::3], rows_before[1::3]) and torch.equal(rows[2::3], rows_before[2::3])
    torch.nn.utils.clip_grads_with_norm_(expected, 0.5, total)
    assert_bitwise_equal(p.grad, expected[0].grad)
    assert_bitwise_equal(q.grad, expected[1].grad)


def test_strided_views_of_many_shapes(backend, seed):
    def base():
        return torch.randn(4, 6, 10, dtype=torch.float64)

    views = [base()[:, 1:5, 2:9], base()[::2, :, ::3], base().transpose(0, 2)[3:7], base()[1, :, 4], base()[:, 2:3, :]]
    params = []
    for v in views:
        p = torch.nn.Parameter(torch.zeros(v.shape, dtype=v.dtype))
        p.grad = v
        params.append(p)
    for norm_type in (1, 2, "inf"):
        check_clip_grad_norm(params, backend, 0.5, norm_type)


def test_expanded_grad_goes_to_torch(backend):
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.ones(3).expand(4, 3)  # elements overlap: torch's mul_ refuses it
    _check_handed_to_torch([p], backend, 1.0)
    if backend in ("auto", "torch"):
        assert fastclip.get_total_norm([p.grad], backend=backend).item() == pytest.approx(math.sqrt(12))


def test_single_element_and_zero_dim_grads(backend, seed):
    params = [torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor(3.0), torch.tensor([4.0])
    total, _ = check_clip_grad_norm(params, backend, 1.0)
    assert total.item() == 5.0


# ---------------------------------------------------------------- grads fused backends hand to torch


def _check_handed_to_torch(params, backend, *args):
    """auto/torch: torch's exact outcome; an explicit fused backend: BackendError."""
    if backend in ("auto", "torch"):
        ours, ref = clone_params(params), clone_params(params)
        got = outcome(fastclip.clip_grad_norm_, ours, *args, backend=backend)
        want = outcome(torch.nn.utils.clip_grad_norm_, ref, *args)
        assert_same_outcome(got, want)
        if got[0] == "ok":
            assert type(got[1]) is type(want[1])
            assert_bitwise_equal(got[1], want[1])
            assert_grads_bitwise_equal(ours, ref)
    else:
        before = grads_of(params)
        with pytest.raises(fastclip.BackendError, match="cannot serve"):
            fastclip.clip_grad_norm_(params, *args, backend=backend)
        for p, g in zip(params, before):
            assert g is None or torch.equal(p.grad.to_dense(), g.to_dense())


def test_complex_grads(backend, seed):
    params = make_params([(4, 3)], dtype=torch.complex64) + make_params([(5,)])
    _check_handed_to_torch(params, backend, 0.5)


def test_sparse_grads(backend):
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.tensor([0.0, 3.0, 0.0, 4.0, 0.0]).to_sparse()
    _check_handed_to_torch([p], backend, 1.0)
    if backend in ("auto", "torch"):
        assert_same_outcome(
            outcome(fastclip.clip_grad_value_, [p], 1.0, backend=backend),
            outcome(torch.nn.utils.clip_grad_value_, [p], 1.0),
        )


class _MyTensor(torch.Tensor):
    pass


def test_tensor_subclass_grads_return_the_subclass(backend, seed):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.randn(3).as_subclass(_MyTensor)
    _check_handed_to_torch([p], backend, 0.1)
    if backend in ("auto", "torch"):
        assert type(fastclip.clip_grad_norm_([p], 0.1, backend=backend)) is _MyTensor


def test_meta_grads(backend):
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    meta.grad = torch.zeros(3, device="meta")
    cpu = torch.nn.Parameter(torch.zeros(2))
    cpu.grad = torch.ones(2)
    for params in ([meta], [cpu, meta], [meta, cpu]):
        for foreach in FOREACH:
            if backend in ("auto", "torch"):
                got = outcome(fastclip.clip_grad_norm_, params, 1.0, foreach=foreach, backend=backend)
                want = outcome(torch.nn.utils.clip_grad_norm_, params, 1.0, foreach=foreach)
                assert got[0] == want[0]
                if got[0] == "raise":
                    assert (got[1], got[2]) == (want[1], want[2])
                else:
                    assert got[1].device == want[1].device and got[1].dtype == want[1].dtype
            else:
                with pytest.raises(fastclip.BackendError):
                    fastclip.clip_grad_norm_(params, 1.0, foreach=foreach, backend=backend)


# ---------------------------------------------------------------- clip_grads_with_norm_


@pytest.mark.parametrize("total_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_clip_grads_with_norm_takes_any_total_dtype(backend, total_dtype, seed):
    for dtype in (torch.float32, torch.float16, torch.float64):
        params = make_params([(4, 4), (3,)], dtype=dtype)
        for value in (0.3, 10, 1e-9):
            total = torch.tensor(value).to(total_dtype)
            ours, ref = clone_params(params), clone_params(params)
            fastclip.clip_grads_with_norm_(ours, 2.0, total, backend=backend)
            torch.nn.utils.clip_grads_with_norm_(ref, 2.0, total)
            assert_grads_bitwise_equal(ours, ref)


@pytest.mark.parametrize(
    "total", [2.0, torch.tensor([10.0]), torch.tensor(NAN), torch.tensor(INF), torch.tensor(0.0), torch.tensor(-5.0)]
)
def test_clip_grads_with_norm_odd_totals(backend, total, seed):
    params = make_params([(3, 3)])
    ours, ref = clone_params(params), clone_params(params)
    got = outcome(fastclip.clip_grads_with_norm_, ours, 1.0, total, backend=backend)
    want = outcome(torch.nn.utils.clip_grads_with_norm_, ref, 1.0, total)
    assert_same_outcome(got, want)
    if got[0] == "raise":
        assert_grads_bitwise_equal(ours, params)
    assert_grads_bitwise_equal(ours, ref)
    # no grads: torch returns before looking at the total
    assert fastclip.clip_grads_with_norm_([torch.nn.Parameter(torch.ones(2))], 1.0, total, backend=backend) is None


# ---------------------------------------------------------------- clip_grad_value_


SPECIAL = [NAN, INF, -INF, 0.0, -0.0, 2.0, -2.0, 0.5, 1e-40, -1e-40, 3.0e38, -3.0e38, 1.0, -1.0]


@pytest.mark.parametrize("clip_value", [NAN, 0.0, -0.0, -1.0, INF, -INF, 1.0, 0.1, 1e-30, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_clip_grad_value_special_values(backend, clip_value, dtype):
    # lengths around the vector width exercise the SIMD body and the scalar tail
    for n in (3, 8, 13, 37):
        values = (SPECIAL * 3)[:n]
        p = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
        p.grad = torch.tensor(values, dtype=torch.float64).to(dtype)
        ref = clone_params([p])
        fastclip.clip_grad_value_([p], clip_value, backend=backend)
        torch.nn.utils.clip_grad_value_(ref, clip_value)
        assert_bitwise_equal(p.grad, ref[0].grad)


@pytest.mark.parametrize("clip_value", [1e5, 65504.5, -7e4, 3.4e38, 1e39, -1e39])
def test_clip_value_overflow_raises_torchs_error_before_any_write(backend, clip_value, seed):
    for dtypes in ([torch.float16], [torch.bfloat16], [torch.float32], [torch.float32, torch.float16, torch.float64]):
        params = [make_params([(50,)], dtype=d, scale=1e3)[0] for d in dtypes]
        before = grads_of(params)
        ref = clone_params(params)
        got = outcome(fastclip.clip_grad_value_, params, clip_value, backend=backend)
        want = outcome(torch.nn.utils.clip_grad_value_, ref, clip_value)
        assert got[0] == want[0], (dtypes, got, want)
        if got[0] == "raise":
            assert (got[1], got[2]) == (want[1], want[2])
            if backend != "torch":  # torch may have clamped other dtype groups already
                for p, g in zip(params, before):
                    assert_bitwise_equal(p.grad, g)
        else:
            assert_grads_bitwise_equal(params, ref)


@pytest.mark.parametrize("clip_value", [-1.0, 0.5, -0.0])
def test_negative_bit_views(backend, clip_value, seed):
    """z.conj().imag is a float view whose memory holds -x.  torch's foreach
    kernels refuse such grads; fastclip's kernels handle them where the sign
    cannot matter and hand clamping to a negative clip_value to torch."""
    z = torch.randn(7, dtype=torch.complex64) * 3

    def param():
        p = torch.nn.Parameter(torch.zeros(7))
        p.grad = z.clone().conj().imag
        assert p.grad.is_neg()
        return p

    materialized = torch.nn.Parameter(torch.zeros(7))
    materialized.grad = param().grad.resolve_neg()
    torch.nn.utils.clip_grad_value_([materialized], clip_value)
    torch_outcome = outcome(torch.nn.utils.clip_grad_value_, [param()], clip_value)
    p = param()
    if backend == "torch" or (backend == "auto" and clip_value < 0):
        assert_same_outcome(outcome(fastclip.clip_grad_value_, [p], clip_value, backend=backend), torch_outcome)
    elif clip_value < 0:
        with pytest.raises(fastclip.BackendError, match="negative bit"):
            fastclip.clip_grad_value_([p], clip_value, backend=backend)
    else:
        fastclip.clip_grad_value_([p], clip_value, backend=backend)
        assert_bitwise_equal(p.grad.resolve_neg(), materialized.grad)
    if is_fused(backend):
        p = param()
        before = p.grad.resolve_neg()
        total = fastclip.clip_grad_norm_([p], 0.5, backend=backend)
        assert total.item() == pytest.approx(torch.linalg.vector_norm(before).item(), rel=1e-6)
        assert_bitwise_equal(p.grad.resolve_neg(), before * torch.clamp(0.5 / (total + 1e-6), max=1.0))


def test_clip_value_conversion_errors_match_torch(backend):
    params = make_params([(3,)])
    for bad in ("abc", None):
        assert_same_outcome(
            outcome(fastclip.clip_grad_value_, params, bad, backend=backend),
            outcome(torch.nn.utils.clip_grad_value_, params, bad),
        )


def test_clip_value_is_idempotent_with_duplicates(backend, seed):
    params = make_params([(100,)], scale=3.0)
    ref = clone_params(params)
    fastclip.clip_grad_value_([params[0], params[0]], 1.0, backend=backend)
    torch.nn.utils.clip_grad_value_([ref[0], ref[0]], 1.0)
    assert_grads_bitwise_equal(params, ref)


# ---------------------------------------------------------------- autograd bookkeeping


def test_modified_grads_bump_the_version_counter(backend, seed):
    params = make_params([(4, 4)], scale=10.0)
    v = params[0].grad._version
    fastclip.clip_grad_norm_(params, 1.0, backend=backend)
    assert params[0].grad._version > v
    v = params[0].grad._version
    fastclip.clip_grad_value_(params, 0.01, backend=backend)
    assert params[0].grad._version > v


def test_a_call_that_scales_by_exactly_1_bumps_the_version_counter_as_readme_says(backend, seed):
    """README (deliberate differences): no scaling pass when the coefficient
    is exactly 1, so the CPU backend leaves the counter alone then, where
    torch's always-run multiply bumps it; the GPU backends decide on the
    device and bump it on every call, like torch."""
    params = make_params([(4, 4), (9,)])
    before = [p.grad._version for p in params]
    fastclip.clip_grad_norm_(params, 1e9, backend=backend)
    after = [p.grad._version for p in params]
    if backend == "cpu" or (backend == "auto" and "cpu" in FUSED):
        assert after == before
    else:
        assert all(a > b for a, b in zip(after, before))


def test_clip_grad_value_leaves_a_nans_bits_where_torchs_vector_clamp_quiets_it(backend):
    """README (deliberate differences, NaN payloads): a signalling fp16 NaN
    (0xfc01) in a tensor of 64 elements stays as it is here; torch's
    vectorised clamp makes it quiet (0xfe01).  NaN stays NaN either way."""
    grad = torch.zeros(64, dtype=torch.float16)
    grad.view(torch.int16)[3] = 0xFC01 - 0x10000
    ours, ref = make_params([(64,)], dtype=torch.float16), make_params([(64,)], dtype=torch.float16)
    ours[0].grad, ref[0].grad = grad.clone(), grad.clone()
    fastclip.clip_grad_value_(ours, 0.5, backend=backend)
    torch.nn.utils.clip_grad_value_(ref, 0.5)
    bits = lambda p: p.grad.view(torch.int16)[3].item() & 0xFFFF  # noqa: E731
    assert torch.isnan(ours[0].grad[3]) and torch.isnan(ref[0].grad[3])
    if backend == "cpu" or (backend == "auto" and "cpu" in FUSED):
        assert (bits(ours[0]), bits(ref[0])) == (0xFC01, 0xFE01)


def test_no_grad_like_wrapper_metadata():
    for name in ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"):
        fn = getattr(fastclip, name)
        assert fn.__name__ == name and fn.__doc__


def test_generator_input_for_elementwise_functions(backend, seed):
    params = make_params([(5,), (6,)], scale=5.0)
    ref = clone_params(params)
    fastclip.clip_grad_value_((p for p in params), 1.0, backend=backend)
    torch.nn.utils.clip_grad_value_((p for p in ref), 1.0)
    assert_grads_bitwise_equal(params, ref)
    fastclip.clip_grads_with_norm_((p for p in params), 0.5, torch.tensor(3.0), backend=backend)
    torch.nn.utils.clip_grads_with_norm_((p for p in ref), 0.5, torch.tensor(3.0))
    assert_grads_bitwise_equal(params, ref)


def test_get_total_norm_of_the_parameters_themselves(backend, seed):
    """get_total_norm(model.parameters()), the weights' norm, as torch takes it:
    nn.Parameter adds nothing to its data, so the fused backends read them."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 3), (40,), (2, 5)]]
    total = fastclip.get_total_norm(params, backend=backend)
    want = torch.nn.utils.get_total_norm(params)
    check_total_norm(total, want, [p.detach() for p in params], 2.0, backend)
    assert type(total) is torch.Tensor and not total.requires_grad


def test_get_total_norm_of_items_that_are_not_tensors_raises_torchs_error(backend):
    """Not a backend's limit: every backend gives torch's own error (a named one too)."""
    for items in ([torch.ones(3), (1.0, 2.0)], [torch.ones(3), None], [[1.0, 2.0]]):
        assert_same_outcome(
            outcome(fastclip.get_total_norm, items, backend=backend), outcome(torch.nn.utils.get_total_norm, items)
        )
