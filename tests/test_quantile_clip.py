"""fastclip.QuantileClip against autoclip.torch.QuantileClip 0.2.1 (the package itself).

autoclip clips each parameter with torch.nn.utils.clip_grad_norm_; with that
replaced by fastclip's (same backend), both see the same norms, so grads,
histories and thresholds must agree bit for bit, step by step.  With
backend="torch" the real, unpatched autoclip is matched bit for bit; on the
fused backends unpatched, within the rounding of the norms.
"""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch

import fastclip

from .helpers import assert_bitwise_equal, assert_raises_leaving_grads, interpreted
from .method_refs import clipper_shapes

autoclip = pytest.importorskip("autoclip.torch", reason="autoclip is not installed (pip install autoclip==0.2.1)")

SETTINGS = [
    {},
    {"global_threshold": True},
    {"quantile": 0.5, "history_length": 7},
    {"quantile": 0.25, "history_length": 5, "global_threshold": True},
    {"quantile": 1.0, "history_length": 3},
    {"quantile": 0.0, "history_length": 4},
]


def make_pair(shapes, dtypes):
    params = [torch.zeros(s, dtype=dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]
    return ([torch.nn.Parameter(p.clone()) for p in params] for _ in range(2))


def set_grads(step, groups, seed, skip=None):
    """The same random grads on both lists; parameter `skip` gets none this step; spikes on some steps."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    scale = 25.0 if step % 5 == 3 else 1.0
    for i, params in enumerate(zip(*groups)):
        grad = torch.randn(params[0].shape, dtype=torch.float64, generator=g, device="cpu") * 0.1 * scale
        grad = grad.to(device=params[0].device, dtype=params[0].dtype)
        for p in params:
            p.grad = None if i == skip else grad.clone()


@pytest.fixture
def patched_torch_clip(monkeypatch):
    """autoclip's torch.nn.utils.clip_grad_norm_ becomes fastclip's on `backend`."""

    def use(backend):
        monkeypatch.setattr(
            torch.nn.utils, "clip_grad_norm_", functools.partial(fastclip.clip_grad_norm_, backend=backend)
        )

    return use


def histories(state_dict):
    return [v["history"] if isinstance(v, dict) else v for v in state_dict["state"].values()]


def assert_same(ours, ref, a, b):
    for p, q in zip(a, b):
        if p.grad is not None:
            assert_bitwise_equal(q.grad, p.grad)
    mine, theirs = histories(ours.state_dict()), histories(ref.state_dict())
    assert len(mine) == len(theirs)
    for x, y in zip(mine, theirs):
        assert_bitwise_equal(x, y)


@pytest.mark.parametrize("dtypes", [[torch.float32, torch.float64], [torch.float32]], ids=["mixed", "float32"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_same_bits_as_autoclip_step_by_step(backend, settings, dtypes, seed, patched_torch_clip):
    """Mixed: a history dtype per grad; float32: the layout kept from step to
    step, dropped while a parameter has no grad (histories of different lengths)."""
    if backend != "torch":
        patched_torch_clip(backend)  # backend="torch": the real autoclip, unpatched
    a, b = make_pair(clipper_shapes(backend), dtypes)
    ref = autoclip.QuantileClip(a, **settings)
    ours = fastclip.QuantileClip(b, **settings, backend=backend)
    for step in range(12 if interpreted(backend) else 24):
        set_grads(step, (a, b), seed, skip=1 if step in (4, 5) else None)  # histories of different lengths
        ref.step()
        assert ours.step() is None
        assert_same(ours, ref, a, b)


def test_parameter_groups_with_their_own_settings(backend, seed, patched_torch_clip):
    if backend != "torch":
        patched_torch_clip(backend)
    a, b = make_pair(clipper_shapes(backend), [torch.float32])
    groups = lambda ps: [{"params": ps[:2], "quantile": 0.3, "history_length": 4}, {"params": ps[2:]}]  # noqa: E731
    ref, ours = autoclip.QuantileClip(groups(a), quantile=0.8), fastclip.QuantileClip(groups(b), quantile=0.8,
                                                                                       backend=backend)  # fmt: skip
    for step in range(10):
        set_grads(step, (a, b), seed)
        ref.step(), ours.step()
        assert_same(ours, ref, a, b)
    assert [g["quantile"] for g in ours.parameter_groups] == [0.3, 0.8]


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
def test_settings_changed_during_the_run_apply_as_in_autoclip(backend, global_threshold, seed, patched_torch_clip):
    """autoclip reads a group's quantile and history_length (global mode: the
    clipper's global_quantile and global_history_length) at every step, as
    schedules change an optimizer's param groups: the history shrinks and
    grows from the step of the change, after that step's norm is appended."""
    if backend != "torch":
        patched_torch_clip(backend)
    a, b = make_pair(clipper_shapes(backend), [torch.float32])
    settings = {"quantile": 0.9, "history_length": 6, "global_threshold": global_threshold}
    ref, ours = autoclip.QuantileClip(a, **settings), fastclip.QuantileClip(b, **settings, backend=backend)
    changes = {4: ("quantile", 0.1), 7: ("history_length", 2), 10: ("history_length", 5), 13: ("quantile", 0.6)}
    for step in range(16):
        if step in changes:
            key, value = changes[step]
            for clipper in (ref, ours):
                if global_threshold:
                    setattr(clipper, f"global_{key}", value)
                else:
                    clipper.parameter_groups[0][key] = value
        set_grads(step, (a, b), seed)
        ref.step(), ours.step()
        assert_same(ours, ref, a, b)


def test_a_tensor_quantile_changed_in_place_applies_as_in_autoclip(backend, seed, patched_torch_clip):
    """A schedule that writes into a quantile tensor (fill_) between steps:
    autoclip reads the tensor at every step, and so must the cached layout."""
    if backend != "torch":
        patched_torch_clip(backend)
    a, b = make_pair(clipper_shapes(backend), [torch.float32])
    qa, qb = torch.tensor(0.9), torch.tensor(0.9)
    ref, ours = autoclip.QuantileClip(a, quantile=qa, history_length=6), fastclip.QuantileClip(b, quantile=qb,
                                                                                              history_length=6,
                                                                                              backend=backend)
    for step in range(10):
        if step in (4, 7):
            for q in (qa, qb):
                q.fill_(0.0 if step == 4 else 0.5)
        set_grads(step, (a, b), seed)
        ref.step(), ours.step()
        assert_same(ours, ref, a, b)


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
def test_close_to_unpatched_autoclip(fused, global_threshold, seed):
    """The real autoclip, float32 and bfloat16 grads: norms differ in rounding only."""
    if interpreted(fused):
        pytest.skip("long sequence: native backends")
    a, b = make_pair([(128, 64), (64,), (10, 300), (77,)], [torch.float32, torch.bfloat16])
    ref = autoclip.QuantileClip(a, history_length=20, global_threshold=global_threshold)
    ours = fastclip.QuantileClip(b, history_length=20, global_threshold=global_threshold, backend=fused)
    for step in range(40):
        set_grads(step, (a, b), seed)
        ref.step(), ours.step()
        for p, q in zip(a, b):
            # autoclip rounds a bfloat16 grad's norm to bfloat16: in global mode every grad sees it
            rtol = 1e-5 if p.dtype == torch.float32 and not global_threshold else 2e-2
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
def test_state_dict_resumes_and_is_autoclips(backend, global_threshold, seed, patched_torch_clip):
    """Ours -> torch.save -> ours resumes bit for bit; autoclip's state dict loads
    into ours and ours into autoclip, and each continues like the other."""
    if backend != "torch":
        patched_torch_clip(backend)
    shapes = clipper_shapes(backend)
    a, b = make_pair(shapes, [torch.float32])
    settings = {"history_length": 6, "global_threshold": global_threshold}
    ref, ours = autoclip.QuantileClip(a, **settings), fastclip.QuantileClip(b, **settings, backend=backend)
    for step in range(9):  # the rings have wrapped
        set_grads(step, (a, b), seed)
        ref.step(), ours.step()
    saved = io.BytesIO()
    torch.save(ours.state_dict(), saved)
    saved.seek(0)
    c, d = make_pair(shapes, [torch.float32])
    resumed = fastclip.QuantileClip(c, **settings, backend=backend)
    resumed.load_state_dict(torch.load(saved))
    from_ref = fastclip.QuantileClip(d, **settings, backend=backend)
    from_ref.load_state_dict(ref.state_dict())
    ref_from_ours = autoclip.QuantileClip(list(make_pair(shapes, [torch.float32]))[0], **settings)
    e = list(ref_from_ours.parameter_groups[0]["params"])
    ref_from_ours.load_state_dict(ours.state_dict())
    for step in range(9, 16):
        set_grads(step, (a, b, c, d, e), seed)
        for clip in (ref, ours, resumed, from_ref, ref_from_ours):
            clip.step()
        for other, params in ((resumed, c), (from_ref, d)):
            assert_same(other, ref, a, params)
        for p, q in zip(a, e):
            assert_bitwise_equal(q.grad, p.grad)


def test_as_optimizer(backend, seed, patched_torch_clip):
    if backend != "torch":
        patched_torch_clip(backend)
    a, b = make_pair(clipper_shapes(backend), [torch.float32])
    ref = autoclip.QuantileClip.as_optimizer(torch.optim.SGD(a, lr=0.1), quantile=0.7, history_length=5)
    ours = fastclip.QuantileClip.as_optimizer(torch.optim.SGD(b, lr=0.1), quantile=0.7, history_length=5,
                                              backend=backend)  # fmt: skip
    assert isinstance(ours, torch.optim.Optimizer) and ours.param_groups[0]["lr"] == 0.1
    scheduler = torch.optim.lr_scheduler.StepLR(ours, step_size=3)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref, step_size=3)
    for step in range(8):
        set_grads(step, (a, b), seed)
        ref.step(), ours.step()
        ref_scheduler.step(), scheduler.step()
        for p, q in zip(a, b):
            assert_bitwise_equal(q, p)
    state = ours.state_dict()
    assert set(state) == {"optimizer", "clipper"} and len(state["clipper"]["state"]) == len(b)
    again = fastclip.QuantileClip.as_optimizer(torch.optim.SGD(list(make_pair(clipper_shapes(backend), [torch.float32]))[0],
                                                                 lr=0.1), history_length=5, backend=backend)  # fmt: skip
    again.load_state_dict(state)
    assert again.clipper.parameter_groups[0]["quantile"] == 0.7


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
def test_statistics_are_device_tensors(backend, global_threshold):
    p, q = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(3))
    clip = fastclip.QuantileClip([p, q], quantile=0.5, history_length=3, global_threshold=global_threshold,
                                 backend=backend)  # fmt: skip
    assert clip.stats() == {"norms": None, "thresholds": None, "coefs": None, "clipped": None}
    steps = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0), (100.0, 0.5)]  # p spikes at the end, q shrinks
    for a, b in steps:
        p.grad, q.grad = torch.full((10,), a), torch.full((3,), b)
        clip.step()
    stats = clip.stats()
    assert all(isinstance(v, torch.Tensor) and v.device == p.device for v in stats.values())
    if global_threshold:
        totals = [math.sqrt(10 * a * a + 3 * b * b) for a, b in steps]
        threshold, norm = sorted(totals[:3])[1], totals[3]
        assert stats["norms"].shape == stats["coefs"].shape == stats["clipped"].shape == ()
        assert stats["clipped"].item()
    else:
        threshold, norm = 2.0 * 10**0.5, 100.0 * 10**0.5  # p's: the median of 1, 2, 3 (x sqrt 10)
        assert stats["clipped"].tolist() == [True, False] and stats["coefs"][1].item() == 1.0
    assert stats["thresholds"].reshape(-1)[0].item() == pytest.approx(threshold)
    assert stats["norms"].reshape(-1)[0].item() == pytest.approx(norm)
    assert stats["coefs"].reshape(-1)[0].item() == pytest.approx(threshold / norm, rel=1e-5)
    assert float(p.grad.norm()) == pytest.approx(10**0.5 * 100.0 * threshold / norm, rel=1e-5)
    if not global_threshold:  # a step with no grads clips nothing: no statistics, not the last step's
        p.grad = q.grad = None
        clip.step()
        assert clip.stats() == {"norms": None, "thresholds": None, "coefs": None, "clipped": None}


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((), {"quantile": 1.5}),
        ((), {"quantile": -0.1}),
        ((), {"quantile": 1}),
        ((), {"history_length": 0}),
        ((), {"history_length": 2.0}),
        (("empty",), {}),
        (("set",), {}),
        (("non-leaf",), {}),
        (("duplicate",), {}),
        (("overlapping groups",), {}),
        (("not iterable",), {}),
    ],
)
def test_arguments_checked_like_autoclip(args, kwargs):
    def params():
        w = torch.nn.Parameter(torch.ones(3))
        kind = args[0] if args else None
        return {
            None: [w],
            "empty": [],
            "set": [{"params": {w}}],
            "non-leaf": [w * 2],
            "duplicate": [w, w],
            "overlapping groups": [{"params": [w]}, {"params": [w]}],
            "not iterable": 3,
        }[kind]

    def outcome(cls):
        try:
            cls(params(), **kwargs)
        except Exception as e:  # noqa: BLE001 - the reference's own exception type
            return type(e), str(e)
        return None

    theirs = outcome(autoclip.QuantileClip)
    assert theirs is not None and outcome(fastclip.QuantileClip) == theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.33, 0.5, 0.9, 0.999, 1.0])
def test_quantiles_of_rows_are_torch_quantile(dtype, q, seed):
    """Every row's quantile, bit for bit: ties, NaN, inf, a single value, both ends of the partial sort."""
    from fastclip.methods.quantile_clip import quantiles

    for n in (1, 2, 7, 100, 1000):
        rows = torch.rand(6, n, dtype=dtype) * 10.0 ** torch.randint(-3, 4, (6, 1)).to(dtype)
        rows[1] = rows[1].round()  # ties
        rows[2, n // 2] = float("nan")
        rows[3, 0] = float("inf")
        want = torch.stack([torch.quantile(r, q) for r in rows])
        assert_bitwise_equal(quantiles(rows, q), want)


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
def test_a_longer_loaded_history_is_kept_until_the_next_steps_cut(backend, global_threshold, seed, patched_torch_clip):
    """A state dict from a run with a longer history, loaded into a clipper
    with a shorter history_length (global mode: global_history_length is not
    in the state dict): autoclip takes the first quantile over the whole
    loaded history and cuts it only after that step's norm."""
    if backend != "torch":
        patched_torch_clip(backend)
    shapes = clipper_shapes(backend)
    a, b = make_pair(shapes, [torch.float32])
    source = autoclip.QuantileClip(a, quantile=0.0, history_length=10, global_threshold=global_threshold)
    for step in range(10):
        set_grads(step, (a,), seed)
        source.step()
    saved = source.state_dict()
    settings = {"quantile": 0.0, "history_length": 3, "global_threshold": global_threshold}
    c, d = make_pair(shapes, [torch.float32])
    ref, ours = autoclip.QuantileClip(c, **settings), fastclip.QuantileClip(d, **settings, backend=backend)
    ref.load_state_dict(saved)
    ours.load_state_dict(saved)
    for step in range(10, 15):
        set_grads(step, (c, d), seed)
        ref.step(), ours.step()
        assert_same(ours, ref, c, d)


def test_a_global_history_turns_float64_as_autoclips(backend, seed, patched_torch_clip):
    """autoclip's global history starts float32 and hstack promotes it once a
    float64 total joins (a float64 grad that had none at the first step), or
    when a float64 history was loaded."""
    if backend != "torch":
        patched_torch_clip(backend)
    a, b = make_pair([(3,), (2,)], [torch.float32, torch.float64])
    settings = {"quantile": 0.5, "global_threshold": True}
    ref, ours = autoclip.QuantileClip(a, **settings), fastclip.QuantileClip(b, **settings, backend=backend)
    for step in range(6):
        set_grads(step, (a, b), seed, skip=1 if step == 0 else None)
        ref.step(), ours.step()
        assert_same(ours, ref, a, b)
    c, d = make_pair([(3,), (2,)], [torch.float32])  # float32 grads, the float64 history loaded
    ref2, ours2 = autoclip.QuantileClip(c, **settings), fastclip.QuantileClip(d, **settings, backend=backend)
    ref2.load_state_dict(ref.state_dict())
    ours2.load_state_dict(ref.state_dict())
    for step in range(6, 10):
        set_grads(step, (c, d), seed)
        ref2.step(), ours2.step()
        assert_same(ours2, ref2, c, d)


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
@pytest.mark.parametrize("bad", [1.5, -0.5, math.nan, "float64 tensor"])
def test_a_quantile_torch_refuses_set_during_the_run_raises_its_error_first(backend, global_threshold, bad, seed):
    """autoclip takes torch.quantile of the history at every step after the
    first: a quantile set to one torch refuses raises torch's error there,
    before that step writes any grad."""
    a, b = make_pair([(3,), (4,)], [torch.float32])
    settings = {"quantile": 0.5, "global_threshold": global_threshold}
    ref, ours = autoclip.QuantileClip(a, **settings), fastclip.QuantileClip(b, **settings, backend=backend)
    set_grads(0, (a, b), seed)
    ref.step(), ours.step()
    value = torch.tensor(0.5, dtype=torch.float64) if bad == "float64 tensor" else bad
    for clipper in (ref, ours):
        if global_threshold:
            clipper.global_quantile = value
        else:
            clipper.parameter_groups[0]["quantile"] = value
    set_grads(1, (a, b), seed)
    before = [p.grad.clone() for p in b]
    with pytest.raises(RuntimeError) as theirs:
        ref.step()
    with pytest.raises(RuntimeError) as mine:
        ours.step()
    assert str(mine.value) == str(theirs.value)
    for p, g in zip(b, before):
        assert_bitwise_equal(p.grad, g)


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
def test_a_history_length_below_one_set_during_the_run_is_refused_first(backend, global_threshold, seed):
    """autoclip slices [-history_length:] (0 keeps all, a negative value
    drops the oldest); the rings cannot: refused before any grad is written (README)."""
    (b,) = list(make_pair([(3,), (4,)], [torch.float32]))[:1]
    ours = fastclip.QuantileClip(b, global_threshold=global_threshold, backend=backend)
    set_grads(0, (b,), seed)
    ours.step()
    for value in (0, -1):
        if global_threshold:
            ours.global_history_length = value
        else:
            ours.parameter_groups[0]["history_length"] = value
        set_grads(1, (b,), seed)
        assert_raises_leaving_grads(lambda _ps: ours.step(), b, ValueError, "history length must be greater than zero")


def test_a_history_length_change_cuts_a_gradless_parameters_history_at_once(backend, seed, patched_torch_clip):
    """README (differences): when a group's history_length changes at a step
    where a parameter has no grad, its history is cut at that step here;
    autoclip cuts it at that parameter's next step with a grad (after using
    the longer history for one more quantile)."""
    if backend != "torch":
        patched_torch_clip(backend)
    a, b = make_pair([(3,), (4,)], [torch.float32])
    ref, ours = autoclip.QuantileClip(a, history_length=6), fastclip.QuantileClip(b, history_length=6, backend=backend)
    for step in range(5):
        set_grads(step, (a, b), seed)
        ref.step(), ours.step()
    for clipper in (ref, ours):
        clipper.parameter_groups[0]["history_length"] = 2
    set_grads(5, (a, b), seed, skip=1)  # the second parameter has no grad at the change
    ref.step(), ours.step()
    theirs, mine = histories(ref.state_dict()), histories(ours.state_dict())
    assert [len(h) for h in theirs] == [2, 5] and [len(h) for h in mine] == [2, 2]
    assert_bitwise_equal(mine[1], theirs[1][-2:])


def test_a_history_length_below_one_from_the_start_is_refused_first(backend, seed):
    """Before any history exists (the first step, or after a load): the same ValueError, grads untouched."""
    (b,) = list(make_pair([(3,), (4,)], [torch.float32]))[:1]
    ours = fastclip.QuantileClip(b, backend=backend)
    ours.parameter_groups[0]["history_length"] = -3  # (the constructor refuses it, as autoclip's)
    set_grads(0, (b,), seed)
    assert_raises_leaving_grads(lambda _ps: ours.step(), b, ValueError, "history length must be greater than zero")


@pytest.mark.parametrize("global_threshold", [False, True], ids=["per-parameter", "global"])
def test_a_huge_history_length_keeps_every_norm_as_autoclip(backend, global_threshold, seed, patched_torch_clip):
    """history_length=2**40 ("keep everything": autoclip's hstack grows as
    norms come): the rings grow with the history instead of being allocated
    whole, past their first 64 columns."""
    if backend != "torch":
        patched_torch_clip(backend)
    a, b = make_pair([(3,), (4,)], [torch.float32])
    settings = {"history_length": 2**40, "quantile": 0.3, "global_threshold": global_threshold}
    ref, ours = autoclip.QuantileClip(a, **settings), fastclip.QuantileClip(b, **settings, backend=backend)
    for step in range(70 if not interpreted(backend) else 66):
        set_grads(step, (a, b), seed)
        ref.step(), ours.step()
        for p, q in zip(a, b):
            assert_bitwise_equal(q.grad, p.grad)
    theirs, mine = histories(ref.state_dict()), histories(ours.state_dict())
    assert [len(h) for h in mine] == [len(h) for h in theirs]


def test_a_bad_state_dict_leaves_the_clipper_as_it_was(seed):
    """An entry that is not a dict is refused before anything changes; an
    empty entry (no history yet) loads, as autoclip starts a history then."""
    (b,) = list(make_pair([(3,), (4,)], [torch.float32]))[:1]
    ours = fastclip.QuantileClip(b, history_length=5)
    for step in range(3):
        set_grads(step, (b,), seed)
        ours.step()
    good = ours.state_dict()
    key = next(iter(good["state"]))
    with pytest.raises(TypeError):
        ours.load_state_dict({**good, "state": {**good["state"], key: 1.5}})
    assert [len(h) for h in histories(ours.state_dict())] == [3, 3]
    ours.load_state_dict({**good, "state": {**good["state"], key: {}}})
    assert [len(h) for h in histories(ours.state_dict())] == [3]
    set_grads(3, (b,), seed)
    ours.step()
    assert sorted(len(h) for h in histories(ours.state_dict())) == [1, 4]


@pytest.mark.parametrize("global_threshold", [False, True])
def test_a_step_refuses_cuda_graph_capture(backend, global_threshold, seed, monkeypatch):
    """The rings' counts and the column a step writes live on the host, which
    a CUDA graph's replay would not update: captured, a step raises before
    anything is read or written (grads and histories as they were).  (The
    capture check, the GPU backends' own, is forced here;
    tests/test_gpu_methods.py captures for real.)"""
    import fastclip.methods.quantile_clip as module

    a, _ = make_pair([(6, 5), (4,)], [torch.float32])
    clipper = fastclip.QuantileClip(a, quantile=0.5, history_length=4, global_threshold=global_threshold,
                                    backend=backend)  # fmt: skip
    for step in range(3):
        set_grads(step, (a,), seed)
        clipper.step()
    set_grads(3, (a,), seed)  # (a spike: a step would clip)
    before = clipper.state_dict()["state"]
    monkeypatch.setattr(module, "capturing", lambda device: True)
    assert_raises_leaving_grads(lambda ps: clipper.step(), a, RuntimeError, "cannot be captured in a CUDA graph")
    after = clipper.state_dict()["state"]
    assert after.keys() == before.keys() and len(after) == (1 if global_threshold else 2)
    for key, history in before.items():
        history, now = (h["history"] if isinstance(h, dict) else h for h in (history, after[key]))
        assert history.numel() == 3 and torch.equal(now, history)
