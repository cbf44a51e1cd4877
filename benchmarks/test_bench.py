"""pytest-benchmark suite: `pytest benchmarks --benchmark-only`.

Each group is one case (layout, dtype, operation) with torch.nn.utils, every
available fastclip backend and the plain-read floor side by side.  The CLI
(`python -m benchmarks`) runs the same cases interleaved and reports
fractions of the floor; this suite plugs the same cases into pytest-benchmark's
tooling (comparisons across runs, --benchmark-json, histograms).
"""

from __future__ import annotations

import functools

import pytest
import torch

from .harness import OPS, _floors, _norm_stats, implementations
from .layouts import gpt2_small, make_grads, resnet50, tiny_tensors

CASES = [
    (gpt2_small, "float32", "norm-noclip"),
    (gpt2_small, "float32", "norm-clip"),
    (gpt2_small, "float32", "value-few"),
    (gpt2_small, "float32", "value-most"),
    (gpt2_small, "bfloat16", "norm-noclip"),
    (gpt2_small, "bfloat16", "norm-clip"),
    (tiny_tensors, "float32", "norm-noclip"),
    # the methods beyond torch's four (benchmarks/methods.py: each against what a user runs instead)
    (gpt2_small, "float32", "per-tensor"),
    (gpt2_small, "float32", "range-few"),
    (gpt2_small, "float32", "range-most"),
    (gpt2_small, "float32", "agc"),
    (gpt2_small, "float32", "groups-noclip"),
    (gpt2_small, "float32", "stats"),
    (resnet50, "float32", "agc"),
    # the stateful clippers and the clip in the training step
    (gpt2_small, "float32", "zclip"),
    (gpt2_small, "float32", "autoclip"),
    (gpt2_small, "float32", "amp-clip"),
    (gpt2_small, "float32", "step-clip"),
    (gpt2_small, "float32", "step-amp"),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PAIRS = [(d, impl) for d in DEVICES for impl in [*implementations(d), "floor"]]


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


@pytest.mark.parametrize(("device", "impl"), PAIRS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].__name__}-{c[1]}-{c[2]}")
def test_clip(benchmark, case, device, impl):
    make, dtype, op_key = case
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
