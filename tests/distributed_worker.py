"""What each rank runs for tests/test_distributed.py (gloo, CPU tensors).

One group of processes per world size runs every scenario in turn and
writes, per rank, {scenario: "ok" or the traceback} to a JSON file; the
tests then read those files.  Every scenario compares fastclip on sharded
grads with torch on the same grads unsharded (every rank builds the full
grads from a shared seed, so the reference needs no communication).
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

SCENARIOS: dict = {}  # name -> (function, world sizes it runs on)
INF = math.inf


def scenario(*worlds):
    def register(fn):
        SCENARIOS[fn.__name__] = (fn, worlds)
        return fn

    return register


def backends() -> list[str]:
    """Backends the local work goes to: the CPU kernels ("auto"), torch, and
    the CUDA kernels in their CPU emulation where built (set by conftest)."""
    import fastclip

    names = ["auto", "torch"]
    if os.environ.get("FASTCLIP_CUDA_EMULATE") == "1" and "cuda" in fastclip.available_backends():
        names.append("cuda")
    return names


def shared_grads(shapes, dtype, seed, nonfinite=None):
    g = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(s, generator=g, dtype=torch.float64) * 3).to(dtype) for s in shapes]
    if nonfinite is not None:
        grads[nonfinite[0]].view(-1)[nonfinite[1]] = float("nan")
    return grads


def timm_agc(params, clip_factor, eps, norm_type) -> None:
    """timm's adaptive_clip_grad on whole parameters (the package's file, loaded
    by path), or where timm is missing the float64-norm reference."""
    from .method_refs import agc_reference, load_timm_agc

    timm = load_timm_agc()
    if timm is not None:
        timm.adaptive_clip_grad(params, clip_factor, eps, norm_type)
        return
    pairs = [(q.detach(), q.grad) for q in params]
    for (_w, g), new in zip(pairs, agc_reference(pairs, clip_factor, eps, float(norm_type))):
        g.copy_(new)


def params_with(grads):
    params = []
    for grad in grads:
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad.clone()
        params.append(p)
    return params


def assert_close(actual, expected, dtype=None):
    torch.testing.assert_close(actual, expected.to(actual.dtype) if dtype is None else expected, rtol=None, atol=None)


def flat_shards(full, rank, world, skip_rank=None):
    """This rank's pieces of the flattened grads, ZeRO-style: the flat vector
    cut into `world` uneven contiguous ranges (none for skip_rank), each
    range kept as one piece per grad it touches."""
    flat = torch.cat([g.reshape(-1) for g in full])
    owners = [r for r in range(world) if r != skip_rank]
    weights = [r + 1 for r in range(len(owners))]
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + flat.numel() * w // sum(weights))
    bounds[-1] = flat.numel()
    if rank not in owners:
        return [], (0, 0)
    i = owners.index(rank)
    lo, hi = bounds[i], bounds[i + 1]
    pieces, start = [], 0
    for g in full:
        a, b = max(lo, start), min(hi, start + g.numel())
        if a < b:
            pieces.append(flat[a:b].clone())
        start += g.numel()
    return pieces, (lo, hi)


SHAPES = [(37, 5), (1,), (0, 3), (129,), (8, 3, 7), (2000,)]


# ---------------------------------------------------------------- process_group=


@scenario(2, 4)
def process_group_matches_unsharded(rank, world):
    import fastclip

    for backend in backends():
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for p in (2.0, 1.0, INF):
                shapes = [s for s in SHAPES if p != INF or 0 not in s]
                full = shared_grads(shapes, dtype, seed=11)
                ref_params = params_with(full)
                ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 1.5, p)
                flat_clipped = torch.cat([q.grad.reshape(-1) for q in ref_params])
                pieces, (lo, hi) = flat_shards(full, rank, world)
                params = params_with(pieces)
                total = fastclip.clip_grad_norm_(params, 1.5, p, backend=backend, process_group=dist.group.WORLD)
                assert type(total) is torch.Tensor and total.dtype == dtype, (backend, total)
                assert_close(total, ref_total)
                mine = torch.cat([q.grad.reshape(-1) for q in params]) if params else flat_clipped[:0]
                assert_close(mine, flat_clipped[lo:hi])
                again = fastclip.get_total_norm(pieces, p, backend=backend, process_group=dist.group.WORLD)
                assert_close(again, torch.nn.utils.get_total_norm(full, p))


@scenario(2)
def inference_mode_grads_over_a_process_group(rank, world):
    # Inference tensors have no version counter: fastclip must not read one.
    import fastclip

    full = shared_grads(SHAPES, torch.float32, seed=13)
    ref_params = params_with(full)
    ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    flat_clipped = torch.cat([q.grad.reshape(-1) for q in ref_params])
    with torch.inference_mode():
        pieces, (lo, hi) = flat_shards([g.clone() for g in full], rank, world)
        params = params_with(pieces)
        for backend in backends():
            for q, piece in zip(params, pieces):
                q.grad = piece.clone()
            total = fastclip.clip_grad_norm_(params, 0.5, backend=backend, process_group=dist.group.WORLD)
            assert_close(total, ref_total)
            assert_close(torch.cat([q.grad.reshape(-1) for q in params]), flat_clipped[lo:hi])


@scenario(2, 4)
def mixed_dtypes_over_a_process_group(rank, world):
    import fastclip

    full = shared_grads(SHAPES[:3], torch.float32, seed=3) + shared_grads(SHAPES[3:], torch.float16, seed=4)
    ref_total = torch.nn.utils.get_total_norm([g.double() for g in full])
    pieces = [flat_shards([g], rank, world)[0] for g in full]  # each grad split over the ranks
    mine = [t for piece in pieces for t in piece]
    total = fastclip.get_total_norm(mine, process_group=dist.group.WORLD)
    assert total.dtype == torch.float32 and math.isclose(total.item(), ref_total.item(), rel_tol=2e-6)


@scenario(2, 4)
def a_rank_without_grads_still_joins(rank, world):
    import fastclip

    for backend in backends():
        for p in (2.0, INF):
            full = shared_grads([(50,), (3, 9)], torch.float32, seed=5)
            ref_params = params_with(full)
            ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 0.5, p)
            pieces, (lo, _hi) = flat_shards(full, rank, world, skip_rank=0)
            params = params_with(pieces)
            total = fastclip.clip_grad_norm_(params, 0.5, p, backend=backend, process_group=dist.group.WORLD)
            assert math.isclose(total.item(), ref_total.item(), rel_tol=1e-6), (rank, total, ref_total)
            if rank == 0:
                assert params == [] and total.device.type == "cpu"
            flat = torch.cat([q.grad.reshape(-1) for q in ref_params])
            for q in params:
                n = q.numel()
                assert_close(q.grad.reshape(-1), flat[lo : lo + n])
                lo += n


@scenario(2, 4)
def nonfinite_raises_on_every_rank_and_leaves_grads(rank, world):
    import fastclip

    full = shared_grads([(40,), (7, 7)], torch.float32, seed=9, nonfinite=(1, 48))  # in the last rank's range
    pieces, _ = flat_shards(full, rank, world)
    params = params_with(pieces)
    before = [q.grad.clone() for q in params]
    try:
        fastclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, process_group=dist.group.WORLD)
    except RuntimeError as exc:
        assert "is non-finite, so it cannot be clipped" in str(exc)
    else:
        raise AssertionError(f"no error on rank {rank}")
    for q, b in zip(params, before):
        assert torch.equal(q.grad.view(torch.int32), b.view(torch.int32))  # bits: NaN != NaN
    total = fastclip.clip_grad_norm_(params, 1.0, process_group=dist.group.WORLD)  # without the flag: NaN
    assert math.isnan(total.item())


@scenario(2, 4)
def pipeline_stages_two_phase(rank, world):
    """Pipeline parallel: each rank is a stage with its own parameters.
    get_total_norm per stage, an all-reduce of p-th powers, then
    clip_grads_with_norm_ with the global total (torchtitan's recipe)."""
    import fastclip

    stages = [shared_grads([(rank_ + 3, 11), (17,)], torch.float32, seed=100 + rank_) for rank_ in range(world)]
    ref_params = params_with([g for stage in stages for g in stage])
    ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 2.0)
    params = params_with(stages[rank])

    local = fastclip.get_total_norm([q.grad for q in params])
    power = local.double() ** 2
    dist.all_reduce(power)
    total = power.sqrt().float()
    fastclip.clip_grads_with_norm_(params, 2.0, total)
    assert_close(total, ref_total)
    mine = ref_params[2 * rank : 2 * rank + 2]
    for q, r in zip(params, mine):
        assert_close(q.grad, r.grad)
    # the same in one call
    params = params_with(stages[rank])
    total = fastclip.clip_grad_norm_(params, 2.0, process_group=dist.group.WORLD)
    assert_close(total, ref_total)
    for q, r in zip(params, mine):
        assert_close(q.grad, r.grad)


# ---------------------------------------------------------------- DTensor


def _dtensor_params(mesh, full, placements):
    from torch.distributed.tensor import distribute_tensor

    params = []
    for grad, placement in zip(full, placements):
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, placement))
        p.grad = distribute_tensor(grad.clone(), mesh, placement)
        params.append(p)
    return params


def _check_dtensor_clip(mesh, shapes, placements, dtype=torch.float32):
    from torch.distributed.tensor import DTensor, Replicate

    import fastclip

    for backend in backends():
        for p in (2.0, 1.0, INF):
            if backend == "torch" and p == INF:
                continue  # torch's inf-norm raises on a rank whose shard is empty (fastclip's does not)
            full = shared_grads(shapes, dtype, seed=21)
            ref_params = params_with(full)
            ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 0.25, p)
            params = _dtensor_params(mesh, full, placements)
            total = fastclip.clip_grad_norm_(params, 0.25, p, backend=backend)
            assert isinstance(total, DTensor) and total.dtype == dtype, total
            assert all(pl == Replicate() for pl in total.placements), total.placements
            assert_close(total.full_tensor(), ref_total)
            assert_close(total.to_local(), ref_total)
            assert math.isclose(total.item(), ref_total.item(), rel_tol=1e-5 if dtype == torch.float32 else 1e-2)
            for q, r, placement in zip(params, ref_params, placements):
                assert isinstance(q.grad, DTensor) and list(q.grad.placements) == list(placement)
                assert_close(q.grad.full_tensor(), r.grad)
            norm = fastclip.get_total_norm([q.grad for q in _dtensor_params(mesh, full, placements)], p)
            assert isinstance(norm, DTensor)
            assert_close(norm.full_tensor(), torch.nn.utils.get_total_norm(full, p))


@scenario(2, 4)
def dtensor_shard_and_replicate_1d(rank, world):
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(5, 3), (7,), (3, 10), (2, 2), (1, 4)]  # uneven: some ranks hold empty shards
    placements = [[Shard(0)], [Shard(0)], [Shard(1)], [Replicate()], [Shard(0)]]
    _check_dtensor_clip(mesh, shapes, placements)
    _check_dtensor_clip(mesh, shapes, placements, torch.bfloat16)


@scenario(4)
def dtensor_2d_mesh(rank, world):
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    shapes = [(6, 5), (9, 4), (3,), (4, 4), (5, 3)]
    placements = [
        [Shard(0), Replicate()],
        [Shard(0), Shard(1)],
        [Replicate(), Shard(0)],
        [Replicate(), Replicate()],
        [Shard(1), Shard(0)],
    ]
    _check_dtensor_clip(mesh, shapes, placements)


@scenario(4)
def dtensors_on_two_meshes(rank, world):
    """Grads on different meshes (e.g. expert and dense parameters): each
    group is reduced over its own mesh, then they add up."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh

    import fastclip

    flat = init_device_mesh("cpu", (world,))
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    full = shared_grads([(7, 3), (8,), (5, 6)], torch.float32, seed=91)
    params = _dtensor_params(flat, full[:2], [[Shard(0)], [Shard(0)]])
    params += _dtensor_params(grid, full[2:], [[Shard(0), Replicate()]])
    ref_params = params_with(full)
    ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    total = fastclip.clip_grad_norm_(params, 0.5)
    assert isinstance(total, DTensor) and total.device_mesh == flat
    assert_close(total.to_local(), ref_total)
    for q, r in zip(params, ref_params):
        assert_close(q.grad.full_tensor(), r.grad)


@scenario(2, 4)
def dtensor_value_clip_and_two_phase(rank, world):
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(9, 2), (5,), (3, 3)]
    placements = [[Shard(0)], [Shard(0)], [Replicate()]]
    full = shared_grads(shapes, torch.float32, seed=31)
    params = _dtensor_params(mesh, full, placements)
    fastclip.clip_grad_value_(params, 0.7)
    for q, g in zip(params, full):
        assert isinstance(q.grad, DTensor)
        assert torch.equal(q.grad.full_tensor(), g.clamp(-0.7, 0.7))
    # get_total_norm then clip_grads_with_norm_ on DTensors
    params = _dtensor_params(mesh, full, placements)
    total = fastclip.get_total_norm([q.grad for q in params])
    fastclip.clip_grads_with_norm_(params, 1.0, total)
    ref_params = params_with(full)
    torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    for q, r in zip(params, ref_params):
        assert_close(q.grad.full_tensor(), r.grad)
    # a DTensor total that is still Partial (torch < 2.13 returned such) is reduced first
    from torch.distributed.tensor import Partial

    partial = DTensor.from_local(total.to_local() / world, mesh, [Partial()], run_check=False)
    params = _dtensor_params(mesh, full, placements)
    fastclip.clip_grads_with_norm_(params, 1.0, partial)
    for q, r in zip(params, ref_params):
        assert_close(q.grad.full_tensor(), r.grad)
    assert all(pl == Replicate() for pl in total.placements)


@scenario(2)
def dtensor_version_counters_follow_their_shards(rank, world):
    # A DTensor grad's wrapper has its own version counter: fastclip bumps it
    # with its shard's when it writes the shard, and not when the scale pass is
    # skipped for a coefficient of exactly 1, as for plain grads.  (torch 2.13's
    # clip_grad_norm_ leaves both counters alone on DTensor grads, even when it
    # scales them: fastclip's rule is the one that lets autograd see the write.)
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    full = shared_grads([(6, 3), (4,)], torch.float32, seed=41)
    # one spec: the norm's local GradList scales the shards; two specs: gathered again
    for placements in ([[Shard(0)], [Shard(0)]], [[Shard(0)], [Replicate()]]):
        for backend, max_norm, writes in [("cpu", 1e9, False), ("cpu", 1e-3, True)]:
            params = _dtensor_params(mesh, full, placements)
            before = [(q.grad._version, q.grad.to_local()._version) for q in params]
            fastclip.clip_grad_norm_(params, max_norm, backend=backend)
            for q, (wrapper, shard) in zip(params, before):
                assert (q.grad._version > wrapper) == writes, (placements, max_norm)
                assert (q.grad.to_local()._version > shard) == writes, (placements, max_norm)


@scenario(2, 4)
def dtensor_inf_norm_with_empty_local_shards(rank, world):
    from torch.distributed.tensor import Shard, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    full = shared_grads([(2, 3), (1,)], torch.float32, seed=41)  # rows < ranks: some shards are empty
    params = _dtensor_params(mesh, full, [[Shard(0)], [Shard(0)]])
    total = fastclip.clip_grad_norm_(params, 0.1, INF)
    assert total.item() == max(g.abs().max().item() for g in full)
    # an empty grad (globally) is torch's error, on every rank alike
    params = _dtensor_params(mesh, [torch.zeros(0, 3)], [[Shard(0)]])
    try:
        fastclip.clip_grad_norm_(params, 0.1, INF)
    except RuntimeError as exc:
        assert "cannot compute the infinity norm on an empty tensor" in str(exc)
    else:
        raise AssertionError("no error")


@scenario(2)
def dtensor_beside_plain_tensors_is_refused_on_every_rank(rank, world):
    """Plain grads beside DTensors (e.g. a module left out of fully_shard) are
    not known to be the same on every rank: refused, as torch refuses them."""
    from torch.distributed.tensor import Shard, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    full = shared_grads([(6, 4), (13,)], torch.float32, seed=51)
    params = _dtensor_params(mesh, full[:1], [[Shard(0)]]) + params_with(full[1:])
    before = [q.grad.clone() for q in params]
    try:
        fastclip.clip_grad_norm_(params, 0.3)
    except RuntimeError as exc:
        assert "mix DTensors and plain tensors" in str(exc)
    else:
        raise AssertionError("no error")
    assert torch.equal(params[0].grad.full_tensor(), before[0].full_tensor())
    assert torch.equal(params[1].grad, before[1])


@scenario(2, 4)
def other_norm_types(rank, world):
    """p = 3, 0.5, -inf: local norms by torch, combined like the fused ones.
    p = 0 (torch counts the nonzero tensors, which shards cannot tell) is refused on every rank."""
    from torch.distributed.tensor import Shard, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(37, 5), (1,), (129,), (8, 3, 7)]
    for p in (3.0, 0.5, -INF):
        full = shared_grads(shapes, torch.float64, seed=61)
        ref_params = params_with(full)
        ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 0.5, p)
        pieces, (lo, hi) = flat_shards(full, rank, world)
        params = params_with(pieces)
        total = fastclip.clip_grad_norm_(params, 0.5, p, process_group=dist.group.WORLD)
        assert_close(total, ref_total)
        flat = torch.cat([q.grad.reshape(-1) for q in ref_params])
        mine = torch.cat([q.grad.reshape(-1) for q in params]) if params else flat[:0]
        assert_close(mine, flat[lo:hi])
        params = _dtensor_params(mesh, full, [[Shard(0)]] * len(full))
        total = fastclip.clip_grad_norm_(params, 0.5, p)
        assert_close(total.full_tensor(), ref_total)
        for q, r in zip(params, ref_params):
            assert_close(q.grad.full_tensor(), r.grad)
    params = params_with(shared_grads(shapes, torch.float64, seed=61))
    try:
        fastclip.clip_grad_norm_(params, 0.5, 0, process_group=dist.group.WORLD)
    except ValueError as exc:
        assert "norm_type=0" in str(exc)
    else:
        raise AssertionError("no error for p=0")


@scenario(2, 4)
def inf_norms_with_empty_pieces(rank, world):
    """Empty pieces add nothing: the inf-norms work on every rank (torch's
    norm of an empty tensor would raise on some ranks only and hang the rest)."""
    from torch.distributed.tensor import Shard, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    full = shared_grads([(3, 5), (1, 4)], torch.float32, seed=71)
    for p in (INF, -INF):
        want = torch.nn.utils.get_total_norm(full, p)
        for backend in backends():
            pieces = [torch.zeros(0), full[0][rank % 3].clone(), torch.zeros(0, 4)]
            if rank >= 3:
                pieces = [torch.zeros(0)]
            got = fastclip.get_total_norm(pieces, p, backend=backend, process_group=dist.group.WORLD)
            rows = [full[0][r % 3] for r in range(min(world, 3))]
            assert got.item() == torch.nn.utils.get_total_norm(rows, p).item(), (backend, p)
            params = _dtensor_params(mesh, full, [[Shard(0)], [Shard(0)]])  # (1, 4): most shards empty
            if backend != "torch":
                got = fastclip.get_total_norm([q.grad for q in params], p, backend=backend)
                assert got.full_tensor().item() == want.item(), (backend, p)


@scenario(2, 4)
def a_nan_on_one_rank_reaches_every_rank(rank, world):
    """gloo's MAX and MIN may drop NaNs: the inf-norms carry a NaN flag."""
    import fastclip

    for p in (INF, -INF, 2.0):
        for nan_rank in range(world):
            pieces = [torch.full((5,), float(rank + 1))]
            if rank == nan_rank:
                pieces[0][2] = float("nan")
            params = params_with(pieces)
            before = params[0].grad.clone()
            try:
                fastclip.clip_grad_norm_(params, 1.0, p, error_if_nonfinite=True, process_group=dist.group.WORLD)
            except RuntimeError as exc:
                assert "is non-finite" in str(exc)
            else:
                raise AssertionError(f"no error on rank {rank} (p={p}, NaN on rank {nan_rank})")
            assert torch.equal(params[0].grad.view(torch.int32), before.view(torch.int32))
            total = fastclip.get_total_norm(pieces, p, process_group=dist.group.WORLD)
            assert math.isnan(total.item()), (p, nan_rank, total)


@scenario(2)
def a_failure_on_one_rank_does_not_hang_the_others(rank, world):
    """Rank 1's grads are complex, which backend="cpu" cannot take: rank 1
    raises BackendError after joining the collective with a failure flag;
    rank 0 gets a NaN total and leaves its grads alone (no hang, no NaN
    grads); with error_if_nonfinite=True rank 0 raises too."""
    import fastclip

    def params():
        grad = torch.full((4,), 3.0) if rank == 0 else torch.ones(4, dtype=torch.complex64)
        return params_with([grad])

    for error_if_nonfinite in (False, True):
        ps = params()
        before = ps[0].grad.clone()
        try:
            total = fastclip.clip_grad_norm_(
                ps, 0.1, error_if_nonfinite=error_if_nonfinite, backend="cpu", process_group=dist.group.WORLD
            )
        except fastclip.BackendError as exc:
            assert rank == 1 and "cannot serve" in str(exc)
        except RuntimeError as exc:
            assert rank == 0 and error_if_nonfinite and "failed on another rank" in str(exc), exc
        else:
            assert rank == 0 and not error_if_nonfinite and math.isnan(total.item())
        assert torch.equal(ps[0].grad, before)


@scenario(2, 4)
def ranks_holding_different_dtypes(rank, world):
    """Rank 0 holds float32, rank 1 float16 (a ZeRO-style split of a mixed
    model; other ranks nothing).  The total over all of them, 1e5, is beyond
    float16: every rank clips with the same float32 total; with
    error_if_nonfinite=True every rank returns it as float32 (the dtype all
    grads promote to) and none raises."""
    import fastclip

    local = {0: [torch.full((4,), 40000.0)], 1: [torch.full((4,), 30000.0, dtype=torch.float16)]}.get(rank, [])
    for error_if_nonfinite in (True, False):
        params = params_with([g.clone() for g in local])
        total = fastclip.clip_grad_norm_(
            params, 1.0, error_if_nonfinite=error_if_nonfinite, process_group=dist.group.WORLD
        )
        if error_if_nonfinite:
            assert total.dtype == torch.float32 and total.item() == 100000.0, total
        else:  # this rank's dtype: float16 overflows there, the float32 total does not
            assert total.dtype == (local[0].dtype if local else torch.float32)
        for q, g in zip(params, local):
            want = (g.float() * torch.clamp(1.0 / (torch.tensor(100000.0) + 1e-6), max=1.0)).to(g.dtype)
            torch.testing.assert_close(q.grad, want)


@scenario(2)
def partial_dtensor_grads(rank, world):
    """Unreduced (Partial) grads: the norm reduces them first; clamping them
    shard by shard would be wrong, so clip_grad_value_ is torch's (which
    refuses them)."""
    from torch.distributed.tensor import DTensor, Partial, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    local = torch.tensor([0.6, -0.6, 0.2]) * (rank + 1)
    whole = sum(torch.tensor([0.6, -0.6, 0.2]) * (r + 1) for r in range(world))

    def params():
        p = torch.nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Partial()], run_check=False))
        p.grad = DTensor.from_local(local.clone(), mesh, [Partial()], run_check=False)
        return [p]

    total = fastclip.get_total_norm([q.grad for q in params()])
    assert_close(total.full_tensor(), torch.linalg.vector_norm(whole))
    ps = params()
    fastclip.clip_grad_norm_(ps, 1.0)
    assert_close(ps[0].grad.full_tensor(), whole * torch.clamp(1.0 / (whole.norm() + 1e-6), max=1.0))
    outcomes = []
    for clip in (fastclip.clip_grad_value_, torch.nn.utils.clip_grad_value_):
        try:
            clip(params(), 1.0)
            outcomes.append("ok")
        except RuntimeError as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes[0] == outcomes[1], outcomes


@scenario(2)
def segmented_methods_on_partial_dtensor_grads(rank, world):
    """Unreduced (Partial) grads: per-tensor, group and AGC norms come from
    the reduced values, and the coefficients scale each rank's own piece (a
    reduced copy would be thrown away), so the reduced grads equal the
    unsharded clip."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    full = shared_grads([(4, 6), (5,), (3, 2)], torch.float32, seed=81)
    weights = shared_grads([(4, 6), (5,), (3, 2)], torch.float32, seed=82)
    pieces = [[(g * (r + 1) / sum(range(1, world + 1))) for r in range(world)] for g in full]

    def params():
        out = []
        for w, ps in zip(weights, pieces):
            q = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Replicate()]))
            q.grad = DTensor.from_local(ps[rank].clone(), mesh, [Partial()], run_check=False)
            out.append(q)
        return out

    whole = [sum(ps) for ps in pieces]
    per_tensor, norms, grouped, group_norms = _unsharded_references(whole, 2.0, split=1)
    ps = params()
    assert_close(fastclip.clip_grad_norm_per_tensor_(ps, 0.7), norms)
    for q, r in zip(ps, per_tensor):
        torch.testing.assert_close(q.grad.full_tensor(), r.grad, rtol=1e-5, atol=1e-7)
    ps = params()
    assert bool((group_norms > 0).all())  # two groups, neither empty
    assert_close(fastclip.clip_grad_norm_groups_([ps[:1], ps[1:]], [0.5, 2.0]), group_norms)
    for q, r in zip(ps, grouped):
        torch.testing.assert_close(q.grad.full_tensor(), r.grad, rtol=1e-5, atol=1e-7)
    ref = params_with(whole)
    for q, w in zip(ref, weights):
        q.data.copy_(w)
    timm_agc(ref, 0.05, 1e-3, 2.0)
    ps = params()
    fastclip.adaptive_clip_grad_(ps, 0.05)
    for q, r in zip(ps, ref):
        torch.testing.assert_close(q.grad.full_tensor(), r.grad, rtol=1e-5, atol=1e-7)
        assert q.grad.placements[0].is_partial()


@scenario(2)
def process_group_under_torch_compile(rank, world):
    """process_group= inside a compiled function runs eagerly (a graph break)
    and still reduces over the group."""
    import fastclip

    torch._dynamo.reset()
    full = shared_grads([(30,), (4, 4)], torch.float32, seed=81)
    pieces, _ = flat_shards(full, rank, world)
    compiled = torch.compile(lambda ts: fastclip.get_total_norm(ts, process_group=dist.group.WORLD), backend="eager")
    assert_close(compiled(pieces), torch.nn.utils.get_total_norm(full))
    params = params_with(pieces)
    step = torch.compile(lambda ps: fastclip.clip_grad_norm_(ps, 0.5, process_group=dist.group.WORLD), backend="eager")
    assert_close(step(params), torch.nn.utils.get_total_norm(full))
    ref_params = params_with(full)
    torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    clipped = torch.cat([q.grad.reshape(-1) for q in ref_params])
    _pieces, (lo, hi) = flat_shards(full, rank, world)
    assert_close(torch.cat([q.grad.reshape(-1) for q in params]), clipped[lo:hi])
    torch._dynamo.reset()


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 33), torch.nn.GELU(), torch.nn.Linear(33, 17), torch.nn.GELU(), torch.nn.Linear(17, 5)
    )


@scenario(2, 4)
def fsdp2_fully_shard_training(rank, world):
    """FSDP2: a few training steps with clipping give the parameters of the
    same model trained unsharded; also through fastclip.patched() and
    torch.nn.utils.clip_grad_norm_ (what accelerate and torchtitan call)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fastclip

    for use_patch in (False, True):
        model, ref = _mlp(0), _mlp(0)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(1)
        for _step in range(3):
            x = torch.randn(16, 12, generator=data)
            model(x).square().mean().backward()  # same batch on every rank: FSDP averages equal grads
            ref(x).square().mean().backward()
            if use_patch:
                with fastclip.patched():
                    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            else:
                total = fastclip.clip_grad_norm_(model.parameters(), 0.05)
            ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            assert isinstance(total, DTensor)
            assert_close(total.to_local(), ref_total)
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
        for q, r in zip(model.parameters(), ref.parameters()):
            assert_close(q.full_tensor(), r.detach())


@scenario(2)
def tensor_parallel_mlp(rank, world):
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    torch.manual_seed(3)
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.weight)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    ref.load_state_dict(model.state_dict())
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    model(x).sum().backward()
    ref(x).sum().backward()
    total = fastclip.clip_grad_norm_(model.parameters(), 0.5)
    ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert_close(total.full_tensor(), ref_total)
    for q, r in zip(model.parameters(), ref.parameters()):
        assert_close(q.grad.full_tensor(), r.grad)


# ---------------------------------------------------------------- the segmented methods
# (fastclip/methods/_sharded.py): every result equals the unsharded one.

SEG_SHAPES = [(9, 5), (1,), (0, 3), (33,), (6, 3, 4), (300,)]


def _rows(full, rank, world, dim=0):
    """This rank's part of each grad along `dim` (torch.tensor_split: uneven, maybe empty)."""
    return [g.tensor_split(world, dim=min(dim, g.dim() - 1))[rank].clone() if g.dim() else g.clone() for g in full]


def _unsharded_references(full, p, split=3):
    """torch on the whole grads: per-tensor clipping, two groups (split at `split`), stats."""
    per_tensor = params_with(full)
    norms = torch.stack([torch.nn.utils.clip_grad_norm_([q], 0.7, p) for q in per_tensor])
    grouped = params_with(full)
    group_norms = torch.stack([torch.nn.utils.clip_grad_norm_(grouped[:split], 0.5, p),
                               torch.nn.utils.clip_grad_norm_(grouped[split:], 2.0, p)])  # fmt: skip
    return per_tensor, norms, grouped, group_norms


@scenario(2, 4)
def segmented_methods_over_a_process_group(rank, world):
    import fastclip

    group = dist.group.WORLD
    for backend in backends():
        for p in (2.0, 1.0, INF):
            shapes = [s for s in SEG_SHAPES if p != INF or 0 not in s]
            full = shared_grads(shapes, torch.float32, seed=71)
            per_tensor, norms, grouped, group_norms = _unsharded_references(full, p)
            parts = _rows(full, rank, world)  # every rank: a part (maybe empty) of every grad
            mine = params_with(parts)
            got = fastclip.clip_grad_norm_per_tensor_(mine, 0.7, p, backend=backend, process_group=group)
            assert_close(got, norms)
            for q, r in zip(mine, _rows([x.grad for x in per_tensor], rank, world)):
                assert_close(q.grad, r)
            mine = params_with(parts)
            got = fastclip.clip_grad_norm_groups_([mine[:3], mine[3:]], [0.5, 2.0], p, backend=backend,
                                                  process_group=group)  # fmt: skip
            assert_close(got, group_norms)
            for q, r in zip(mine, _rows([x.grad for x in grouped], rank, world)):
                assert_close(q.grad, r)
            stats = fastclip.grad_stats(params_with(parts), p, backend=backend, process_group=group)
            assert_close(stats.total_norm, torch.nn.utils.get_total_norm(full, p))
            assert_close(stats.per_tensor_norms, torch.stack([torch.linalg.vector_norm(g, p) for g in full]))
            assert stats.num_zeros.item() == sum(int((g == 0).sum()) for g in full)
            # zeros, an inf and a NaN, each in some rank's part: counted once, and one collective per call
            odd = [g.clone() for g in full]
            odd[0].view(-1)[::3] = 0.0
            odd[0].view(-1)[1] = math.inf
            odd[-1].view(-1)[-1] = math.nan
            calls = []
            real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_into_tensor")}
            for name, fn in real.items():
                setattr(dist, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
            try:
                stats = fastclip.grad_stats(params_with(_rows(odd, rank, world)), p, backend=backend,
                                            process_group=group)  # fmt: skip
            finally:
                for name, fn in real.items():
                    setattr(dist, name, fn)
            assert len(calls) == 1, calls
            assert stats.num_zeros.item() == sum(int((g == 0).sum()) for g in odd)
            assert stats.num_nonfinite.item() == 2
            want = torch.stack([torch.linalg.vector_norm(g, p) for g in odd])
            torch.testing.assert_close(stats.per_tensor_norms, want, equal_nan=True, rtol=1e-5, atol=1e-6)
            assert math.isnan(stats.total_norm.item())


@scenario(2, 4)
def agc_over_a_process_group(rank, world):
    """process_group=: every rank holds a part of every unit (shards along dim 1,
    1-D tensors along dim 0): the units' norms are reduced over the group."""

    for backend in backends():
        for p in (2.0, 1.0, INF):
            shapes = [(9, 40), (7,), (6, 8, 3), (1, 30)]
            weights = shared_grads(shapes, torch.float32, seed=72)
            full = [g * 0.01 for g in shared_grads(shapes, torch.float32, seed=73)]
            full[0][::2] *= 10  # every other unit of the first tensor clips
            ref = _check_agc_over_the_group(rank, world, weights, full, p, backend)
            clipped = [bool((x.grad != g).any(dim=-1).any()) for x, g in zip(ref[:1], full[:1])]
            assert any(clipped)  # the comparison saw clipping


def _check_agc_over_the_group(rank, world, weights, full, p, backend) -> list:
    """fastclip's AGC over process_group= on this rank's pieces (cut along dim 1)
    against timm's code on the whole tensors; returns the whole parameters."""
    import fastclip

    ref = params_with(full)
    for q, w in zip(ref, weights):
        q.data.copy_(w)
    timm_agc(ref, 0.02, 1e-3, p)
    mine = params_with(_rows(full, rank, world, dim=1))
    for q, w in zip(mine, _rows(weights, rank, world, dim=1)):
        q.data = w
    fastclip.adaptive_clip_grad_(mine, 0.02, 1e-3, p, backend=backend, process_group=dist.group.WORLD)
    for q, r in zip(mine, _rows([x.grad for x in ref], rank, world, dim=1)):
        torch.testing.assert_close(q.grad, r, rtol=1e-5, atol=1e-9)
    return ref


@scenario(2, 4)
def segmented_methods_on_dtensors(rank, world):
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (world,))
    placements = [[Shard(0)], [Replicate()], [Shard(0)], [Shard(0)], [Shard(1)], [Replicate()]]
    for p in (2.0, INF):
        shapes = [s for s in SEG_SHAPES if p != INF or 0 not in s]
        pl = [x for s, x in zip(SEG_SHAPES, placements) if p != INF or 0 not in s]
        full = shared_grads(shapes, torch.float32, seed=74)
        per_tensor, norms, grouped, group_norms = _unsharded_references(full, p)
        params = _dtensor_params(mesh, full, pl)
        assert_close(fastclip.clip_grad_norm_per_tensor_(params, 0.7, p), norms)
        for q, r in zip(params, per_tensor):
            assert_close(q.grad.full_tensor(), r.grad)
        params = _dtensor_params(mesh, full, pl)
        assert_close(fastclip.clip_grad_norm_groups_([params[:3], params[3:]], [0.5, 2.0], p), group_norms)
        for q, r in zip(params, grouped):
            assert_close(q.grad.full_tensor(), r.grad)
        stats = fastclip.grad_stats(_dtensor_params(mesh, full, pl), p)
        assert_close(stats.total_norm, torch.nn.utils.get_total_norm(full, p))
        assert stats.num_zeros.item() == sum(int((g == 0).sum()) for g in full)  # replicated ones counted once


def _check_dtensor_agc(mesh, weights, grads, placements):
    """fastclip's AGC on DTensor parameters against timm's code on the whole ones."""
    from torch.distributed.tensor import distribute_tensor

    import fastclip

    ref = params_with(grads)
    for q, w in zip(ref, weights):
        q.data.copy_(w)
    timm_agc(ref, 0.02, 1e-3, 2.0)
    params = []
    for w, g, pl in zip(weights, grads, placements):
        q = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, pl))
        q.grad = distribute_tensor(g.clone(), mesh, pl)
        params.append(q)
    fastclip.adaptive_clip_grad_(params, 0.02)
    for q, r in zip(params, ref):
        torch.testing.assert_close(q.grad.full_tensor(), r.grad, rtol=1e-5, atol=1e-9)


@scenario(2, 4)
def agc_on_dtensors(rank, world):
    """Shard(0) parameters hold whole units (no collective for them); Shard(1)
    and 1-D Shard(0) ones split units over the ranks."""
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(9, 40), (7, 12), (30,), (6, 8, 3), (5, 5)]
    placements = [[Shard(0)], [Shard(1)], [Shard(0)], [Shard(2)], [Replicate()]]
    weights = shared_grads(shapes, torch.float32, seed=75)
    full = [g * 0.01 for g in shared_grads(shapes, torch.float32, seed=76)]
    _check_dtensor_agc(mesh, weights, full, placements)


@scenario(4)
def segmented_methods_on_a_2d_mesh(rank, world):
    """HSDP/TP-like 2-D mesh: Shard(0) on one dim, Replicate or Shard(1) on the other."""
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    import fastclip

    mesh = init_device_mesh("cpu", (2, 2))
    shapes = [(8, 6), (10, 4), (12,)]
    placements = [[Shard(0), Replicate()], [Shard(0), Shard(1)], [Replicate(), Shard(0)]]
    full = shared_grads(shapes, torch.float32, seed=77)
    params = _dtensor_params(mesh, full, placements)
    stats = fastclip.grad_stats(params)
    assert_close(stats.total_norm, torch.nn.utils.get_total_norm(full))
    assert_close(stats.per_tensor_norms, torch.stack([g.norm() for g in full]))
    assert stats.num_zeros.item() == 0 and stats.num_nonfinite.item() == 0
    _check_dtensor_agc(mesh, shared_grads(shapes, torch.float32, seed=78), [g * 0.01 for g in full], placements)


@scenario(2, 4)
def agc_when_a_rank_holds_nothing_of_a_unit(rank, world):
    """AGC's inf-norm over process_group= with an empty piece (no rank sees the
    whole unit, so none may refuse it as empty), and Shard(0) DTensors with
    fewer rows than ranks (FSDP2's small layers: a rank holds no unit)."""
    from torch.distributed.tensor import Shard, init_device_mesh


    shapes = [(3,), (9, 1), (3, 5)]
    weights = shared_grads(shapes, torch.float32, seed=79)
    full = [g * 0.01 for g in shared_grads(shapes, torch.float32, seed=80)]
    full[2][1] *= 100  # a unit that clips
    for backend in backends():
        _check_agc_over_the_group(rank, world, weights, full, INF, backend)
    mesh = init_device_mesh("cpu", (world,))
    _check_dtensor_agc(mesh, weights[2:], full[2:], [[Shard(0)]])  # (3, 5) over 4 ranks: the last has no row


@scenario(2, 4)
def norm_groups_when_a_rank_has_no_grad_in_a_group(rank, world):
    """clip_grad_norm_groups_(process_group=): a rank whose piece of a
    parameter is empty may have left its grad None; the groups' norms still
    line up (rank 0 holds all of group 0, rank 1 all of group 1, others none)."""
    import fastclip

    main, mtp = torch.full((4,), 3.0), torch.full((4,), 4.0)  # norms 6 and 8
    for backend in backends():
        params = params_with([main, mtp])
        for i in range(2):
            if i != rank:
                params[i].grad = None
        norms = fastclip.clip_grad_norm_groups_([params[:1], params[1:]], 1.0, backend=backend,
                                                process_group=dist.group.WORLD)  # fmt: skip
        assert norms.tolist() == [6.0, 8.0], norms
        if rank < 2:
            torch.testing.assert_close(params[rank].grad, torch.full((4,), 0.5))


@scenario(2)
def zclip_when_ranks_hold_different_dtypes(rank, world):
    """ZClip(process_group=) with float32 pieces on rank 0 and bfloat16 (or
    float64) ones on rank 1: every rank keeps the statistics of ZClip on the
    whole grads (whose norm is float32, or float64) and clips with its
    coefficient, also in warm-up (max_grad_norm: clip_grad_norm_'s
    coefficient, float64 arithmetic when a rank holds float64 grads), though
    each rank returns the norm in its own dtype, as clip_grad_norm_ does."""
    import fastclip

    for other, max_grad_norm in ((torch.bfloat16, None), (torch.float64, 5.0)):
        for backend in backends():
            # the whole as the shards' sums take a bfloat16 norm: accumulated exactly (fused), or in bfloat16 (torch)
            settings = {"warmup_steps": 3, "max_grad_norm": max_grad_norm}
            whole = fastclip.ZClip(**settings, backend="torch" if backend == "torch" else "cpu")
            ours = fastclip.ZClip(**settings, backend=backend, process_group=dist.group.WORLD)
            clipped = []
            for step in range(7):
                g = torch.Generator().manual_seed(100 + step)
                scale = 40.0 if step == 5 else 1.0
                full = [torch.randn(50, generator=g) * scale, (torch.randn(50, generator=g) * scale).to(other)]
                ref = params_with(full)
                want = whole.step(ref)
                mine = params_with([full[rank]])
                got = ours.step(mine)
                assert got.dtype == full[rank].dtype
                assert_close(got, want)
                coefs = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
                dist.all_gather(coefs, ours.last_coef.to(torch.float64))
                assert len({c.item() for c in coefs}) == 1, (step, coefs)  # one coefficient on every rank
                torch.testing.assert_close(ours.last_coef, whole.last_coef, rtol=1e-6, atol=0)  # (sums in another order)
                if rank == 0:  # torch multiplies float32 grads by a coefficient taken in float32
                    torch.testing.assert_close(mine[0].grad, full[0] * ours.last_coef.float(), rtol=0, atol=0)
                torch.testing.assert_close(mine[0].grad, ref[rank].grad)
                clipped.append(bool(ours.last_clipped))
            # (max_grad_norm 5 is below every norm: every step clips, warm-up included)
            assert clipped == ([True] * 7 if max_grad_norm else [i == 5 for i in range(7)])
            means = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
            dist.all_gather(means, ours.mean)
            assert len({m.item() for m in means}) == 1, means  # the same statistics on every rank
            torch.testing.assert_close(ours.mean, whole.mean, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- driver


def run(rank: int, world: int, init_file: str, out_dir: str, names: list) -> None:
    # a crash (SIGSEGV, SIGABRT, ...) writes every thread's Python stack there,
    # for the test to report (the file stays open until the process ends)
    faulthandler.enable(file=open(os.path.join(out_dir, f"rank{rank}.faults"), "w"))  # noqa: SIM115
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    results = {}
    for name in names:
        try:
            SCENARIOS[name][0](rank, world)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported by the test of this scenario
            results[name] = traceback.format_exc()
        if os.environ.get("FASTCLIP_DIST_VERBOSE"):
            print(rank, name, results[name], file=sys.stderr, flush=True)
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
    # End without Python's finalization: a gloo work thread may still drop its
    # last reference to a tensor then, and a thread taking the GIL during
    # finalization aborts the process ('terminate called without an active
    # exception', seen now and then with torch 2.13).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def names_for(world: int) -> list[str]:
    return [name for name, (_fn, worlds) in SCENARIOS.items() if world in worlds]


def _zclip_sequence(step, shapes):
    """Step `step`'s whole grads, the same on every rank; a spike at steps 6 and 11."""
    scale = 40.0 if step in (6, 11) else 1.0
    return [g * scale for g in shared_grads(shapes, torch.float32, seed=80 + step)]


@scenario(2)
def zclip_over_a_process_group_and_on_dtensors(rank, world):
    """ZClip on shards (rows of every grad over process_group=, or DTensors)
    keeps the statistics of ZClip on the whole grads, on every rank."""
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    import fastclip

    shapes = [(9, 40), (7,), (6, 8, 3), (1, 30)]
    mesh = init_device_mesh("cpu", (world,))
    placements = [[Shard(0)], [Replicate()], [Shard(1)], [Shard(0)]]
    for backend in backends():
        settings = {"warmup_steps": 3, "max_grad_norm": None}  # only spikes clip
        whole = fastclip.ZClip(**settings, backend="torch")
        ours = fastclip.ZClip(**settings, backend=backend, process_group=dist.group.WORLD)
        ours_dt = fastclip.ZClip(**settings, backend=backend)
        clipped = []
        for step in range(14):
            full = _zclip_sequence(step, shapes)
            ref = params_with(full)
            want = whole.step(ref)
            clipped.append(bool(whole.last_clipped))
            mine = params_with(_rows(full, rank, world))
            assert_close(ours.step(mine), want)
            for q, r in zip(mine, _rows([x.grad for x in ref], rank, world)):
                assert_close(q.grad, r)
            dts = _dtensor_params(mesh, full, placements)
            got = ours_dt.step(dts)
            assert type(got) is torch.Tensor  # the statistics are plain tensors on every rank
            assert_close(got, want)
            for q, r in zip(dts, ref):
                assert_close(q.grad.full_tensor(), r.grad)
        assert [i for i, c in enumerate(clipped) if c] == [6, 11]
        for stat in ("mean", "var"):  # float64 statistics of float32 norms: their rounding
            for clip in (ours, ours_dt):
                torch.testing.assert_close(getattr(clip, stat), getattr(whole, stat), rtol=1e-5, atol=0)


@scenario(2)
def training_step_functions_over_a_process_group_and_on_dtensors(rank, world):
    """unscale_clip_grad_norm_ and clip_grad_norm_into_step_ on shards clip
    with the norm of the whole, as torch's recipe on the whole grads does."""
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    import fastclip

    shapes = [(9, 40), (7,), (6, 8, 3), (1, 30)]
    mesh = init_device_mesh("cpu", (world,))
    placements = [[Shard(0)], [Replicate()], [Shard(1)], [Shard(0)]]
    for backend in backends():
        for inject in (False, True):
            full = [g * 1024.0 for g in shared_grads(shapes, torch.float32, seed=90)]  # scaled by the scaler's 2^10
            if inject:
                full[2].view(-1)[5] = INF
            ref = params_with(full)
            ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            ref_scaler.scale(torch.ones(()))
            ref_opt = torch.optim.SGD(ref, lr=0.1)
            ref_scaler.unscale_(ref_opt)
            want = torch.nn.utils.clip_grad_norm_(ref, 2.0)
            for how in ("unscale", "into"):
                for layout in ("process_group", "dtensor"):
                    if layout == "process_group":
                        mine, group = params_with(_rows(full, rank, world)), dist.group.WORLD
                        expected = _rows([x.grad for x in ref], rank, world)
                    else:
                        mine, group = _dtensor_params(mesh, full, placements), None
                        expected = [x.grad for x in ref]
                    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
                    scaler.scale(torch.ones(()))
                    opt = torch.optim.SGD(mine, lr=0.1)
                    if how == "unscale":
                        got = fastclip.unscale_clip_grad_norm_(scaler, opt, 2.0, backend=backend, process_group=group)
                    else:
                        got = fastclip.clip_grad_norm_into_step_(opt, 2.0, scaler=scaler, backend=backend,
                                                                 process_group=group)  # fmt: skip
                    got = got.full_tensor() if hasattr(got, "full_tensor") else got
                    torch.testing.assert_close(got, want, equal_nan=True)
                    for q, r in zip(mine, expected):
                        grad = q.grad.full_tensor() if layout == "dtensor" else q.grad
                        torch.testing.assert_close(grad, r, equal_nan=True)
                    found = sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
                    # over a process group only the rank whose shard holds the inf finds it
                    local_inf = any(bool((~torch.isfinite(x)).any()) for x in _rows(full, rank, world))
                    assert (found > 0) == (inject and (layout != "process_group" or local_inf))


if __name__ == "__main__":  # python -m tests.distributed_worker WORLD: run them by hand
    import tempfile

    import torch.multiprocessing as mp

    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    os.environ["FASTCLIP_DIST_VERBOSE"] = "1"
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run, args=(world, os.path.join(d, "init"), d, names_for(world)), nprocs=world)
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                outcomes = json.load(f)
            for name, outcome in outcomes.items():
                print(r, name, "ok" if outcome == "ok" else "\n" + outcome)
