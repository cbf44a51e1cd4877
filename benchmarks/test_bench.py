"""pytest-benchmark suite: `pytest benchmarks --benchmark-only`.

Each group is one case (layout, dtype, operation) with its baseline, every
available fastclip backend and the floor side by side.  The cases are the
CLI's (`python -m benchmarks`: benchmarks/__main__.py's SUITE, and on a GPU
SUITE_CUDA); the CLI interleaves the implementations, flushes the cache
before each call of a large layout and reports fractions of the floor, while
this suite times each implementation alone in pytest-benchmark's tooling
(comparisons across runs, --benchmark-json, histograms).
"""

from __future__ import annotations

import functools

import pytest
import torch

from .__main__ import SUITE, SUITE_CUDA
from .harness import OPS, _floors, _norm_stats, implementations
from .layouts import make_grads

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, layout maker, dtype, operation): the CLI's cases
CASES = [
    (device, make, dtype, op)
    for device in DEVICES
    for make, dtype, ops in (SUITE_CUDA if device == "cuda" else SUITE)
    for op in ops
]


@functools.lru_cache(maxsize=2)
def _grads(make, dtype, device):
    params = make_grads(make(), dtype, device)
    return params, [p.grad.clone() for p in params], _norm_stats(params, methods=True)


def _synced(fn, device):
    if device != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _impls(device: str) -> list:
    return [*implementations(device), "floor"]


@pytest.mark.parametrize("impl", sorted({i for d in DEVICES for i in _impls(d)}))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{getattr(c[1], '__name__', 'layout')}-{c[2]}-{c[3]}")
def test_clip(benchmark, case, impl):
    device, make, dtype, op_key = case
    if impl not in _impls(device):
        pytest.skip(f"{impl} does not run on {device}")
    op = OPS[op_key]
    params, backup, stats = _grads(make, dtype, device)
    grads = [p.grad for p in params]
    benchmark.group = f"{device} {make.__name__} {dtype} {op.name} (baseline: {op.baseline})"
    benchmark.extra_info.update(numel=sum(g.numel() for g in grads), tensors=len(grads))

    def restore():
        torch._foreach_copy_(grads, backup)

    if impl == "floor":  # the least traffic the operation needs, fastest way known
        floors = _floors(params, device)
        floors["step"] = {"fused AdamW step": stats["steps"].plain_step}
        kinds = {"read": ["read"], "rw": ["rw"], "read+rw": ["read", "rw"], "read2": ["read", "read"],
                 "read+step": ["read", "step"]}[op.floor]  # fmt: skip
        plain = {k: [f for f in floors[k].values() if not isinstance(f, tuple)] for k in kinds}
        fns = [min(plain[k], key=lambda f: _time_once(_synced(f, device))) for k in kinds]
        benchmark.pedantic(_synced(lambda: [f() for f in fns], device), rounds=_rounds(grads), warmup_rounds=1)
        return
    module = implementations(device)[impl]
    run = _synced(functools.partial(op.call, module, params, stats), device)
    benchmark.pedantic(run, setup=restore if op.modifies else None, rounds=_rounds(grads), warmup_rounds=1)
    restore()


def _rounds(grads) -> int:
    return 100 if sum(g.numel() for g in grads) < 10_000_000 else 10


def _time_once(fn) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
