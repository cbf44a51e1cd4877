"""python -m benchmarks.distributed: clipping sharded grads across ranks.

Starts WORLD ranks on gloo (CPU) and times, on each rank's shards of a
layout's grads:
  * FSDP2's layout: every grad a DTensor sharded on dim 0 over a 1-D mesh;
    torch.nn.utils.clip_grad_norm_ against fastclip.clip_grad_norm_;
  * grads sharded by hand (plain tensors, each rank a dim-0 shard):
    torch's recipe (get_total_norm, all-reduce of the squared norm,
    clip_grads_with_norm_) against fastclip.clip_grad_norm_(...,
    process_group=...).
A round's time is the slowest rank's.  The floor is a plain read (and
in-place write) of each rank's shard bytes, all ranks at once.  Prints the
table and writes JSON, Markdown and a PNG to benchmarks/results/ (stem
suffixed _distributed).  Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from .harness import OPS, CaseResult, _floors
from .layouts import fill_random, gpt2_small, tiny_tensors
from .report import machine_info, summarize, table, write_all

SUITE = [
    (gpt2_small, "float32", ["norm-noclip", "norm-clip"]),
    (gpt2_small, "bfloat16", ["norm-noclip", "norm-clip"]),
    (tiny_tensors, "float32", ["norm-noclip"]),
]
PAIRS = {  # fastclip impl -> the torch impl it is compared with
    "fastclip DTensor": "torch DTensor",
    "fastclip process_group=": "torch recipe (group)",
}


NOTE = (
    "Distributed: {world} gloo ranks on this machine, 1 thread each; a round's time is the slowest rank's; "
    "GB/s and the floor count each rank's shard bytes, read by all ranks at once (the floor has no collective, "
    "every clipping call one small all-reduce: for tiny layouts 'of floor' is low by that). 'vs torch' compares "
    "fastclip DTensor with torch DTensor (torch.nn.utils.clip_grad_norm_ on the DTensor params), and "
    "fastclip process_group= with torch's recipe on plain shards (get_total_norm, all_reduce of the "
    "squared norm, clip_grads_with_norm_)."
)


def _shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """torch.chunk's split of dim 0 (DTensor's Shard(0)): (start, length) of this rank's rows."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, max(0, min(chunk, rows - start))


def _local_grads(layout, dtype, rank, world, seed=0):
    """This rank's dim-0 shard of every grad, random N(0, 1e-2), with the global shapes."""
    gen = torch.Generator().manual_seed(seed + rank)
    shards, shapes = [], []
    for shape, _role in layout.shapes:
        _, rows = _shard_rows(shape[0], rank, world)
        shards.append(fill_random(torch.empty((rows, *shape[1:]), dtype=getattr(torch, dtype)), gen))
        shapes.append(torch.Size(shape))
    return shards, shapes


def _entries(layout, dtype, op_key, rank, world, mesh):
    from torch.distributed.tensor import DTensor, Shard

    import fastclip

    shards, shapes = _local_grads(layout, dtype, rank, world)
    backup = [g.clone() for g in shards]
    dt_params, plain_params = [], []
    for local, shape in zip(shards, shapes):
        grad = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=_strides(shape))
        p = torch.nn.Parameter(DTensor.from_local(torch.empty_like(local), mesh, [Shard(0)], run_check=False,
                                                  shape=shape, stride=_strides(shape)))  # fmt: skip
        p.grad = grad
        dt_params.append(p)
        q = torch.nn.Parameter(torch.empty_like(local))
        q.grad = local  # the same memory as the DTensor's shard
        plain_params.append(q)
    total = fastclip.get_total_norm(shards, process_group=dist.group.WORLD).item()
    max_norm = 1e9 if op_key == "norm-noclip" else total / 2

    def torch_recipe():
        norm = torch.nn.utils.get_total_norm([q.grad for q in plain_params])
        power = norm.double() ** 2
        dist.all_reduce(power)
        torch.nn.utils.clip_grads_with_norm_(plain_params, max_norm, power.sqrt().to(norm.dtype))

    modifies = OPS[op_key].modifies
    entries = [
        ("torch DTensor", lambda: torch.nn.utils.clip_grad_norm_(dt_params, max_norm), modifies),
        ("fastclip DTensor", lambda: fastclip.clip_grad_norm_(dt_params, max_norm), modifies),
        ("torch recipe (group)", torch_recipe, modifies),
        ("fastclip process_group=",
         lambda: fastclip.clip_grad_norm_(plain_params, max_norm, process_group=dist.group.WORLD), modifies),
    ]  # fmt: skip
    for kind, fns in _floors(plain_params, "cpu").items():
        for label, fn in fns.items():
            entries.append((f"floor:{kind}:{label}", fn, kind == "rw"))
    nbytes = sum(g.numel() * g.element_size() for g in shards)
    return entries, shards, backup, nbytes


def _strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _rank_main(rank, world, init_file, out_file, cases, rounds):
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = []
    for layout_name, make_args, dtype, op_key in cases:
        layout = {"gpt2_small": gpt2_small, "tiny_tensors": tiny_tensors}[layout_name](*make_args)
        entries, shards, backup, nbytes = _entries(layout, dtype, op_key, rank, world, mesh)
        times = {name: [] for name, _, _ in entries}
        for r in range(rounds + 1):  # round 0 warms up
            shift = r % len(entries)
            for name, fn, modifies in entries[shift:] + entries[:shift]:
                if modifies:
                    torch._foreach_copy_(shards, backup)
                dist.barrier()
                start = time.perf_counter()
                fn()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
                if r > 0:
                    times[name].append(elapsed.item())
        results.append({"layout": f"{layout.name} /{world}", "dtype": dtype, "op": op_key,
                        "tensors": len(layout), "numel": layout.numel, "nbytes_per_rank": nbytes,
                        "times": times})  # fmt: skip
        del entries, shards, backup
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()
    # End without Python's finalization: a gloo work thread may still drop its
    # last reference to a tensor then, and a thread taking the GIL during
    # finalization aborts the process ('terminate called without an active
    # exception', seen now and then with torch 2.13).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rows(raw: list[dict]) -> list[dict]:
    rows = []
    for case in raw:
        result = CaseResult(case["layout"], case["dtype"], case["op"], case["tensors"], case["numel"],
                            case["nbytes_per_rank"])  # fmt: skip
        result.times = case["times"]
        result.pick_floors()
        result.times["torch"] = result.times["torch DTensor"]  # summarize() wants one; replaced below
        case_rows = [row for row in summarize(result) if row["impl"] != "torch"]
        by_impl = {row["impl"]: row for row in case_rows}
        for row in case_rows:  # each fastclip call against its own torch counterpart
            baseline = by_impl[PAIRS.get(row["impl"], row["impl"])]
            row["speedup_vs_torch"] = baseline["median_ms"] / row["median_ms"]
            row["compared_with"] = baseline["impl"]
        rows += case_rows
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2: one per core here)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the host-overhead case only")
    parser.add_argument("--tiny", type=int, default=2000, help="tensors in the host-overhead case (default 2000)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    suite = SUITE[-1:] if args.quick else SUITE
    cases = [
        (make.__name__, (args.tiny,) if make is tiny_tensors else (), dtype, op)
        for make, dtype, ops in suite
        for op in ops
    ]
    import torch.multiprocessing as mp

    start = time.perf_counter()
    print(f"{len(cases)} cases on {args.world} gloo ranks, {args.rounds} rounds each ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "results.json")
        mp.spawn(_rank_main, args=(args.world, os.path.join(tmp, "init"), out_file, cases, args.rounds),
                 nprocs=args.world)  # fmt: skip
        with open(out_file) as f:
            raw = json.load(f)
    rows = _rows(raw)
    print(table(rows))
    print(f"(per rank: {args.world} ranks x 1 thread; a round's time is the slowest rank's; "
          f"'vs torch' compares each fastclip call with the torch call above it; {time.perf_counter() - start:.0f} s)")  # fmt: skip
    if not args.no_save:
        machine = machine_info("cpu")
        machine.update(threads=1, ranks=args.world, backend="gloo")
        stem = f"{time.strftime('%Y-%m-%d')}_cpu-{machine['cores']}c_{machine['commit'].replace('+', '-')}_distributed"
        for path in write_all(rows, machine, args.out, stem):
            if path.endswith(".md"):
                with open(path, "a") as f:
                    f.write("\n" + NOTE.format(world=args.world) + "\n")
            print(f"wrote {path}", file=sys.stderr)
    return 0 if all(math.isfinite(r["median_ms"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
