"""python -m benchmarks: fastclip against torch.nn.utils and the libraries it replaces, on realistic layouts.

Prints a table (median time, GB/s, fraction of the memory floor measured in
the same run, speedup vs the baseline) and writes JSON, Markdown and a PNG plot to
benchmarks/results/.  Run it on a quiet machine: nothing else should be
building, testing or benchmarking beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

from .harness import OPS, run_case
from .layouts import billion, gpt2_small, llama_blocks, make_grads, resnet50, tiny_tensors, vit_base
from .report import machine_info, summarize, table, write_all

# (layout, dtype, ops): the default suite
BASELINE_PACKAGES = {"agc": "timm", "zclip": "zclip", "autoclip": "autoclip"}  # operation -> the package it is timed against
TORCH_OPS = ["norm-noclip", "norm-clip", "value-few", "value-most"]
METHODS = ["per-tensor", "range-few", "range-most", "agc", "groups-noclip", "stats", "zclip", "autoclip",
           "amp-clip", "step-clip", "step-amp"]
SUITE = [
    (gpt2_small, "float32", TORCH_OPS + METHODS),
    (gpt2_small, "bfloat16", TORCH_OPS),
    (gpt2_small, "mixed", ["norm-noclip", "norm-clip"]),
    (llama_blocks, "bfloat16", ["norm-noclip", "norm-clip"]),
    (vit_base, "float32", ["norm-noclip", "norm-clip"]),
    (tiny_tensors, "float32", ["norm-noclip", "norm-clip", "value-few", "per-tensor", "stats", "zclip", "autoclip"]),
    (resnet50, "float32", ["agc"]),
]
# On a GPU: the 1e9-element reference workload of the Triton/CUDA issues, plus
# the host-overhead case (300 and 2000 tensors).
SUITE_CUDA = [
    (billion, "bfloat16", TORCH_OPS),
    (billion, "float32", ["norm-noclip", "norm-clip"]),
    (gpt2_small, "bfloat16", ["norm-noclip", "norm-clip"]),
    (gpt2_small, "mixed", ["norm-noclip", "norm-clip"]),
    (lambda: tiny_tensors(300, 64), "float32", ["norm-noclip", "norm-clip"]),
    (tiny_tensors, "float32", ["norm-noclip", "norm-clip", "value-few"]),
    (gpt2_small, "float32", METHODS),
    (resnet50, "float32", ["agc"]),
]
QUICK = [
    (gpt2_small, "float32", ["norm-noclip", "norm-clip"]),
    (gpt2_small, "bfloat16", ["norm-noclip"]),
    (tiny_tensors, "float32", ["norm-noclip"]),
]
# The headline GPU cases for one short lease (`.ci/gpu quick`): the reference
# workload in bf16 and fp32, GPT-2 small, and the host-overhead case.
QUICK_CUDA = [
    (billion, "bfloat16", ["norm-noclip", "norm-clip", "value-few"]),
    (billion, "float32", ["norm-noclip", "norm-clip"]),
    (gpt2_small, "float32", ["norm-noclip", "norm-clip", "value-few"] + METHODS),
    (gpt2_small, "bfloat16", ["norm-noclip"]),
    (tiny_tensors, "float32", ["norm-noclip", "norm-clip"]),
]


def rounds_for(layout, device: str) -> int:
    # tiny layouts take micro- to milliseconds per call: many rounds are cheap
    if layout.numel < 10_000_000:
        return 200
    return 15 if device == "cuda" and layout.numel > 500_000_000 else 25


def suite_for(quick: bool, device: str) -> list:
    if device == "cuda":
        return QUICK_CUDA if quick else SUITE_CUDA
    return QUICK if quick else SUITE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short subset (about a minute)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default: 25, 200 for tiny layouts)")
    parser.add_argument(
        "--deadline-s", type=float, help="start no case after this many seconds; report the cases done (GPU leases)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the grads live")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder for the JSON, Markdown and PNG (default: benchmarks/results)")
    parser.add_argument("--name", help="file stem for the results (default: date_machine_commit)")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), help="only these operations of the suite")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here")

    suite = suite_for(args.quick, args.device)
    cases = [(make(), dtype, op) for make, dtype, ops in suite for op in ops if not args.ops or op in args.ops]
    if not cases:
        parser.error(f"no case of the {'quick ' if args.quick else ''}suite runs {' '.join(args.ops)}")
    missing = {op: pkg for op, pkg in BASELINE_PACKAGES.items() if importlib.util.find_spec(pkg) is None}
    if any(op in missing for _l, _d, op in cases):  # (the baselines of the methods: see pyproject's bench extra)
        print("not installed, so not run: " + ", ".join(f"{op} (its baseline {pkg})" for op, pkg in missing.items()),
              file=sys.stderr)  # fmt: skip
        cases = [c for c in cases if c[2] not in missing]
    machine = machine_info(args.device)
    print(
        f"fastclip vs its baselines on {machine['device']} ({machine['cpu']}, {machine['threads']} threads), "
        f"commit {machine['commit']}",
        file=sys.stderr,
    )
    rows, start, skipped = [], time.perf_counter(), []
    params, params_of = None, None  # one layout's grads at a time, shared by its consecutive cases
    for i, (layout, dtype, op) in enumerate(cases, 1):
        elapsed = time.perf_counter() - start
        if args.deadline_s is not None and elapsed > args.deadline_s:
            skipped.append(f"{layout.name} {dtype} {OPS[op].name}")
            continue
        eta = f", about {elapsed / (i - 1) * (len(cases) - i + 1):.0f}s left" if i > 1 else ""
        print(f"[{i}/{len(cases)}] {layout.name} {dtype} {OPS[op].name}{eta}", file=sys.stderr, flush=True)
        if params_of != (layout.name, dtype):
            params = None  # free the last layout's memory first
            params, params_of = make_grads(layout, dtype, args.device), (layout.name, dtype)
        result = run_case(layout, dtype, op, args.rounds or rounds_for(layout, args.device), args.device, params=params)
        rows += summarize(result)
    del params
    print()
    print(table(rows))
    if skipped:
        print(f"past the deadline ({args.deadline_s:.0f} s), not run: " + "; ".join(skipped))
    if not args.no_save:
        tag = f"{args.device}-{machine['cores']}c" if args.device == "cpu" else "cuda"
        stem = args.name or f"{time.strftime('%Y-%m-%d')}_{tag}_{machine['commit'].replace('+', '-')}"
        for path in write_all(rows, machine, args.out, stem):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
