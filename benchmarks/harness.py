"""Cases, implementations and the timing protocol.

Every case is timed against torch.nn.utils and against two floors measured
in the same run on the same bytes: a plain read, and a read plus an in-place
write.  Implementations take turns inside every round (the order rotates),
so a machine that slows down mid-run slows all of them alike.  Grads are
restored from a copy before every call that modifies them.  For layouts
larger than the last-level cache, every timed call, whatever it is, starts
from the same clean, cold state: a scratch buffer larger than that cache is
read first (no dirty lines of a restore are still being written back).
Small layouts (the host-overhead case) stay warm, as they are right after a
backward pass.  Neither step is timed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

import fastclip
from fastclip._dispatch import FUSED_BACKENDS
from fastclip._work import collect

from .layouts import Layout, make_grads
from .methods import Baseline, Fastclip, method_stats


@dataclass(frozen=True)
class Op:
    name: str
    modifies: bool
    floor: str  # "read", "read+rw", "rw", "read2" (grads and weights) or "read+step": the least the operation needs
    call: object  # (impl, params, stats) -> None; impl is methods.Baseline or methods.Fastclip
    baseline: str = "torch"  # what the baseline row runs (its label in the tables)


def _norm_stats(params, methods: bool = False):
    grads = [p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
    std = (norm**2 / sum(g.numel() for g in grads)) ** 0.5
    stats = {"norm": norm, "std": std}
    if methods:
        stats.update(method_stats(params))
    return stats


OPS = {
    "norm-noclip": Op("clip_grad_norm_ (no clip)", False, "read", lambda m, p, s: m.clip_grad_norm_(p, 1e9)),
    "norm-clip": Op("clip_grad_norm_ (clipping)", True, "read+rw", lambda m, p, s: m.clip_grad_norm_(p, s["norm"] / 2)),
    "value-few": Op("clip_grad_value_ (few change)", True, "read", lambda m, p, s: m.clip_grad_value_(p, 3 * s["std"])),
    "value-most": Op(
        "clip_grad_value_ (most change)", True, "rw", lambda m, p, s: m.clip_grad_value_(p, 1e-3 * s["std"])
    ),
    # the methods beyond torch (benchmarks/methods.py)
    "per-tensor": Op("per-tensor clip (1 in 8 clips)", True, "read",
                     lambda m, p, s: m.per_tensor(p, s["max_norms"]), "torch loop"),
    "range-few": Op("clip_grad_range_ (few change)", True, "read",
                    lambda m, p, s: m.value_range(p, -3 * s["std"], 4 * s["std"]), "clamp_ loop"),
    "range-most": Op("clip_grad_range_ (most change)", True, "rw",
                     lambda m, p, s: m.value_range(p, -1e-3 * s["std"], 2e-3 * s["std"]), "clamp_ loop"),
    "agc": Op("AGC (1 unit in 10 clips)", True, "read2", lambda m, p, s: m.agc(p, s["clip_factor"]), "timm"),
    "groups-noclip": Op("3 norm groups (no clip)", False, "read", lambda m, p, s: m.groups(s["groups"], 1e9),
                        "torch per group"),
    "stats": Op("grad_stats", False, "read", lambda m, p, s: m.stats(p), "torch foreach"),
    # the stateful clippers (each call is one more step of a clipper kept per implementation)
    "zclip": Op("ZClip step (no spike)", False, "read", lambda m, p, s: m.zclip(p, s["clippers"]), "zclip"),
    "autoclip": Op("QuantileClip step (1 in 8 clips)", True, "read", lambda m, p, s: m.autoclip(p, s["clippers"]),
                   "autoclip"),
    # the clip in the training step (floor "read+step": one read of the grads and a fused AdamW step alone)
    "amp-clip": Op("GradScaler unscale_ + clip", True, "read+rw", lambda m, p, s: m.amp_clip(p, s["steps"]),
                   "torch recipe"),
    "step-clip": Op("clip + fused AdamW step", True, "read+step", lambda m, p, s: m.step_clip(p, s["steps"], False),
                    "torch recipe"),
    "step-amp": Op("AMP clip + fused AdamW step", True, "read+step",
                   lambda m, p, s: m.step_clip(p, s["steps"], True), "torch recipe"),
}  # fmt: skip
METHOD_OPS = {"per-tensor", "range-few", "range-most", "agc", "groups-noclip", "stats", "zclip", "autoclip",
              "amp-clip", "step-clip", "step-amp"}  # fmt: skip


def implementations(device: str) -> dict:
    impls = {"torch": Baseline()}
    for name in fastclip.available_backends():
        # each fused backend on the device type it is for (not Triton's interpreter on CPU tensors)
        if name != "torch" and device in FUSED_BACKENDS[name].auto_device_types:
            impls[f"fastclip:{name}"] = Fastclip(name)
    return impls


@dataclass
class CaseResult:
    layout: str
    dtype: str
    op: str
    tensors: int
    numel: int
    nbytes: int
    times: dict = field(default_factory=dict)  # impl or floor name -> [seconds]
    floor_sources: dict = field(default_factory=dict)  # "read"/"rw" -> which measurement was fastest
    host: dict = field(default_factory=dict)  # CUDA: impl -> [seconds until the call returned, before the sync]
    launches: dict = field(default_factory=dict)  # CUDA: impl -> kernels one call ran (torch profiler)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def pick_floors(self) -> None:
        """Each floor ("read", "rw") is the fastest of its measurements ("floor:<kind>:<label>")."""
        for kind in ("read", "rw", "step"):
            if not any(n.startswith(f"floor:{kind}:") for n in self.times):
                continue
            best = min((n for n in self.times if n.startswith(f"floor:{kind}:")), key=self.median)
            self.times[f"floor:{kind}"] = self.times[best]
            self.floor_sources[kind] = best.split(":", 2)[2]

    def floor_seconds(self, op: Op) -> float:
        read, rw = self.median("floor:read"), self.median("floor:rw")
        if op.floor == "read+step":
            return read + self.median("floor:step")
        return {"read": read, "rw": rw, "read+rw": read + rw, "read2": 2 * read}[op.floor]

    def bytes_needed(self, op: Op) -> int:
        # a fused AdamW step moves param, grad, exp_avg, exp_avg_sq in and param, exp_avg, exp_avg_sq out
        return {"read": 1, "rw": 2, "read+rw": 3, "read2": 2, "read+step": 8}[op.floor] * self.nbytes


EVICT_BYTES = 64 << 20  # more than the last-level cache of the machines measured


def _evictor(device: str, nbytes: int):
    if device != "cpu" or nbytes < EVICT_BYTES // 2:
        return lambda: None
    scratch = torch.ones(EVICT_BYTES // 4)
    return lambda: scratch.sum()


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _floors(params, device: str):
    """Fastest known ways to read, and to read and write back, the same bytes:
    label -> function, or (function, factor) when the time counts `factor` times
    (a device copy moves the bytes twice: half its time is one read)."""
    nbytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    flat = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)  # one buffer of the same size
    floors = {"read": {"torch flat sum": lambda: flat.sum()}, "rw": {"torch flat mul_": lambda: flat.mul_(1.0)}}
    if device == "cuda":
        dst = torch.empty_like(flat)
        floors["read"]["device copy / 2"] = (lambda: dst.copy_(flat), 0.5)
        floors["rw"]["device copy"] = lambda: dst.copy_(flat)
    if device == "cpu" and "cpu" in fastclip.available_backends():
        from fastclip.backends.cpu import _ext

        table = collect([p.grad for p in params], False)[1].table
        threads = torch.get_num_threads()
        floors["read"]["fastclip read"] = lambda: _ext.touch_read(table, threads)
        floors["rw"]["fastclip read+write"] = lambda: _ext.touch_write(table, threads)
    return floors


def _kernels_launched(fn) -> int:
    """Kernels (not copies or fills) one call runs on the GPU, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if not n.lower().startswith(("memcpy", "memset")))


def run_case(
    layout: Layout, dtype: str, op_key: str, rounds: int, device: str = "cpu", seed: int = 0, params=None
) -> CaseResult:
    """Time one case.  `params`: the layout's grads made already (make_grads;
    restored to their values on return), else made here."""
    op = OPS[op_key]
    if params is None:
        params = make_grads(layout, dtype, device, seed)
    grads = [p.grad for p in params]
    backup = [g.clone() for g in grads]
    stats = _norm_stats(params, methods=op_key in METHOD_OPS)
    impls = implementations(device)
    floors = _floors(params, device)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    result = CaseResult(layout.name, dtype, op_key, len(layout), layout.numel, nbytes)

    def restore():
        torch._foreach_copy_(grads, backup)

    evict = _evictor(device, nbytes)
    entries = [(name, (lambda m=m: op.call(m, params, stats)), op.modifies) for name, m in impls.items()]
    if op.floor == "read+step":
        floors["step"] = {"fused AdamW step": stats["steps"].plain_step}
    factors = {}
    for kind, fns in floors.items():
        for label, fn in fns.items():
            fn, factors[f"floor:{kind}:{label}"] = fn if isinstance(fn, tuple) else (fn, 1.0)
            entries.append((f"floor:{kind}:{label}", fn, kind == "rw"))
    for name, _, _ in entries:
        result.times[name] = []
        if device == "cuda" and name in impls:
            result.host[name] = []
    for r in range(rounds + 1):  # round 0 warms up
        # rotated, and reversed every other round: each implementation follows a
        # different one from round to round (torch's OpenMP worker spins for a
        # while after its calls and slows whatever runs next)
        shift = r % len(entries)
        order = entries[shift:] + entries[:shift]
        for name, fn, modifies in order[::-1] if r % 2 else order:
            if modifies:
                restore()
            evict()
            _sync(device)
            start = time.perf_counter()
            fn()
            returned = time.perf_counter()
            _sync(device)
            if r > 0:
                result.times[name].append((time.perf_counter() - start) * factors.get(name, 1.0))
                if name in result.host:
                    result.host[name].append(returned - start)
    if device == "cuda":
        for name, fn, modifies in entries:
            if name in impls:
                if modifies:
                    restore()
                result.launches[name] = _kernels_launched(fn)
    result.pick_floors()
    restore()
    return result
