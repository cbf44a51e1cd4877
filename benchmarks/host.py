"""python -m benchmarks.host: the time of a call on many tiny tensors
(2000 of 64 elements by default), where a call is nearly all host work:
gathering the grads, the tables, the launch (on a CPU also the kernels).

Each implementation is timed alone, in blocks of calls (fastclip's many,
torch's fewer: one of its calls costs 20-30 of ours), the blocks of all
implementations taking turns for several rounds; a block's mean is one
sample and the median of the samples is reported.  Blocks rather than
single calls, because torch's OpenMP worker spins on the other core for a
while after torch's calls and slows whatever runs next (README); a block
of 200 fast calls dilutes that.  The issue's target compares the stateful
clippers and fastclip's clip_grad_norm_ with torch's clip_grad_norm_ on the
same grads ("≥30x less host time"): a GPU target; on a CPU the kernels are
part of the time.  Writes JSON and Markdown to benchmarks/results (not with
--no-save).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import fastclip

from .report import machine_info


def _params(count: int, size: int, device: str):
    gen = torch.Generator(device).manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.zeros(size, device=device))
        p.grad = torch.randn(size, generator=gen, device=device) * 1e-2
        params.append(p)
    return params


def implementations(params, backend: str | None) -> dict:
    """name -> (call, calls per block).  Nothing clips (max_norm far above the
    norm, ZClip after its warm-up without a spike), so repeated calls see the
    same grads."""
    zclip = fastclip.ZClip(warmup_steps=5, max_grad_norm=None, backend=backend)  # (no clip in warm-up either)
    for _ in range(10):
        zclip.step(params)
    grads = [p.grad for p in params]
    impls = {
        "torch clip_grad_norm_": (lambda: torch.nn.utils.clip_grad_norm_(params, 1e9), 20),
        "fastclip clip_grad_norm_": (lambda: fastclip.clip_grad_norm_(params, 1e9, backend=backend), 200),
        "fastclip ZClip.step": (lambda: zclip.step(params), 200),
        "fastclip grad_stats": (lambda: fastclip.grad_stats(params, backend=backend), 200),
        "fastclip get_total_norm": (lambda: fastclip.get_total_norm(grads, backend=backend), 200),
    }
    return impls


def measure(impls: dict, rounds: int, device: str) -> dict:
    """name -> [mean seconds per call of each block]."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn, n in impls.values():  # warm-up: compile, cache tables
        for _ in range(max(n // 10, 2)):
            fn()
    sync()
    samples = {name: [] for name in impls}
    for _ in range(rounds):
        for name, (fn, n) in impls.items():
            sync()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def report(samples: dict, machine: dict, count: int, size: int) -> tuple[str, list]:
    torch_ms = statistics.median(samples["torch clip_grad_norm_"]) * 1e3
    rows = []
    for name, s in samples.items():
        ms = statistics.median(s) * 1e3
        rows.append({"implementation": name, "median_ms": ms, "min_ms": min(s) * 1e3, "max_ms": max(s) * 1e3,
                     "torch_over_this": torch_ms / ms})  # fmt: skip
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, torch {machine['torch']}, "
        f"fastclip {machine['fastclip']} ({machine['cpu_isa']}), device {machine['device']}, "
        f"commit {machine['commit']}, {machine['date']}.",
        "",
        f"{count} tensors of {size} elements; blocks of calls per implementation in turn, "
        "median (min-max) of the blocks' mean per call; the last column: torch's clip_grad_norm_ time over this one's.",
        "",
        "| implementation | median ms | min-max ms | torch / this |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['implementation']} | {r['median_ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} | "
                     f"{r['torch_over_this']:.1f}x |")  # fmt: skip
    return "\n".join(lines) + "\n", rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="tensors (default 2000)")
    parser.add_argument("--size", type=int, default=64, help="elements per tensor (default 64)")
    parser.add_argument("--rounds", type=int, default=7, help="blocks per implementation (default 7)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", help="fastclip's backend (default: auto)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here")
    machine = machine_info(args.device)
    params = _params(args.count, args.size, args.device)
    samples = measure(implementations(params, args.backend), args.rounds, args.device)
    text, rows = report(samples, machine, args.count, args.size)
    print(text)
    if not args.no_save:
        tag = f"{args.device}-{machine['cores']}c" if args.device == "cpu" else "cuda"
        stem = f"{time.strftime('%Y-%m-%d')}_{tag}_{machine['commit'].replace('+', '-')}_host"
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump({"machine": machine, "count": args.count, "size": args.size, "results": rows}, f, indent=1)
        with open(os.path.join(args.out, stem + ".md"), "w") as f:
            f.write(text)
        print(f"wrote {os.path.join(args.out, stem)}.{{json,md}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
