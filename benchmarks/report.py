"""Turning measurements into a table, JSON, Markdown and a PNG plot."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

import fastclip

from .harness import OPS, CaseResult


def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    info = fastclip.backend_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # "+dirty": the code differs from the commit (recorded results do not count);
        # $FASTCLIP_COMMIT where there is no .git (a copy of the tree on a lent GPU machine)
        "commit": (git("rev-parse", "--short", "HEAD") or os.environ.get("FASTCLIP_COMMIT", "unknown"))
        + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results") else ""),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastclip": fastclip.__version__,
        "cpu_isa": info["cpu"].get("isa"),
    }


def summarize(r: CaseResult) -> list[dict]:
    op = OPS[r.op]
    floor = r.floor_seconds(op)
    torch_s = r.median("torch")
    rows = []
    for name in [n for n in r.times if not n.startswith("floor")]:
        t = r.median(name)
        rows.append(
            {
                "layout": r.layout,
                "dtype": r.dtype,
                "op": op.name,
                "impl": op.baseline if name == "torch" else name,  # the baseline: what a user runs instead
                "tensors": r.tensors,
                "numel": r.numel,
                "median_ms": t * 1e3,
                "min_ms": min(r.times[name]) * 1e3,
                "rounds": len(r.times[name]),
                "gb_per_s": r.bytes_needed(op) / t / 1e9,
                "fraction_of_floor": floor / t,
                "speedup_vs_torch": torch_s / t,
                "floor_ms": floor * 1e3,
                "floor": op.floor,
                "floor_sources": dict(r.floor_sources),
            }
        )
        if name in r.host:  # CUDA: host time of a call, and kernels launched
            rows[-1]["host_us"] = statistics.median(r.host[name]) * 1e6
            rows[-1]["launches"] = r.launches.get(name)
    return rows


HEADER = ["layout", "dtype", "operation", "impl", "median ms", "GB/s", "of floor", "vs baseline"]
CUDA_HEADER = ["host us", "launches"]


def table(rows: list[dict]) -> str:
    cuda = any("host_us" in row for row in rows)
    lines = [rows_to_line(HEADER + (CUDA_HEADER if cuda else []))]
    for row in rows:
        cells = [
            row["layout"],
            row["dtype"],
            row["op"],
            row["impl"],
            f"{row['median_ms']:.3f}",
            f"{row['gb_per_s']:.1f}",
            f"{row['fraction_of_floor']:.0%}",
            f"{row['speedup_vs_torch']:.2f}x",
        ]
        if cuda:
            cells += [f"{row.get('host_us', 0):.0f}", str(row.get("launches", ""))]
        lines.append(rows_to_line(cells))
    return "\n".join(lines)


WIDTHS = [13, 9, 31, 14, 10, 7, 9, 9, 8, 8]


def rows_to_line(cells) -> str:
    return "  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))


def markdown(rows: list[dict], machine: dict) -> str:
    cuda = any("host_us" in r for r in rows)
    gpu = f"{machine['device']}; host " if machine.get("device", "cpu") != "cpu" else ""
    out = [
        f"Machine: {gpu}{machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, "
        f"torch {machine['torch']}, fastclip {machine['fastclip']} ({machine['cpu_isa']}), "
        f"commit {machine['commit']}, {machine['date']}.",
        "",
        "| layout | dtype | operation | impl | median ms | GB/s | of floor | vs baseline |"
        + (" host us | launches |" if cuda else ""),
        "|---|---|---|---|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""),
    ]
    for r in rows:
        out.append(
            f"| {r['layout']} | {r['dtype']} | {r['op']} | {r['impl']} | {r['median_ms']:.3f} | "
            f"{r['gb_per_s']:.1f} | {r['fraction_of_floor']:.0%} | {r['speedup_vs_torch']:.2f}x |"
            + (f" {r.get('host_us', 0):.0f} | {r.get('launches', '')} |" if cuda else "")
        )
    out += [
        "",
        "GB/s counts the bytes the operation needs at least, in grad bytes: 1x (one read: no clip, few values "
        "change, statistics, ZClip), 2x (a read and a write: most values change), 3x (clipping: a read, then a "
        "read and a write), 2x (AGC: one read of the weights and of the grads), 8x (the clip in a fused AdamW "
        "step: one read of the grads, plus the step's read of parameters, grads and both moments and its "
        "writes of parameters and moments); "
        "'of floor' is the time of the fastest plain pass of the same kind over the same bytes in the same run "
        "(a read, an in-place write, both; for the step cases a read plus a fused AdamW step alone) "
        "divided by the operation's time.  'vs baseline' is against the baseline row of each case: torch.nn.utils "
        "for torch's functions; for the methods, what a user runs instead (benchmarks/methods.py): a loop of "
        "clip_grad_norm_([p]) (per-tensor), a loop of clamp_(lo, hi) (range), timm's adaptive_clip_grad (AGC), "
        "clip_grad_norm_ per group (groups), torch's _foreach_norm with isfinite and zero counts (grad_stats), "
        "zclip's ZClip.step (ZClip), autoclip's QuantileClip.step (QuantileClip), GradScaler.unscale_ then "
        "clip_grad_norm_ (AMP clip), clip_grad_norm_ then a fused AdamW step, with unscale_ under AMP (the "
        "clip in the step)."
        + (
            " On CUDA the floors also include a device-to-device copy (half its time for one read); "
            "'host us' is the time until the call returned (before the device finished), 'launches' the "
            "kernels one call ran (torch profiler)."
            if cuda
            else ""
        ),
    ]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], machine: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = []
    for r in rows:
        key = f"{r['layout']} {r['dtype']}\n{r['op']}"
        if key not in cases:
            cases.append(key)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.55 * len(cases) + 2), sharey=True)
    height = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        ys, speed, frac = [], [], []
        for r in rows:
            if r["impl"] == impl:
                ys.append(cases.index(f"{r['layout']} {r['dtype']}\n{r['op']}") + k * height)
                speed.append(r["speedup_vs_torch"])
                frac.append(r["fraction_of_floor"])
        axes[0].barh(ys, speed, height=height, label=impl)
        axes[1].barh(ys, frac, height=height, label=impl)
    axes[0].set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("speedup vs the baseline (median)")
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("fraction of the measured memory floor")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"fastclip {machine['fastclip']} vs torch {machine['torch']} on "
        f"{machine['device'] if machine.get('device', 'cpu') != 'cpu' else machine['cpu']} "
        f"({machine['threads']} threads), {machine['commit']}, {machine['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(rows: list[dict], machine: dict, out_dir: str, stem: str, with_plot: bool = True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, machine))
    paths = [base + ".json", base + ".md"]
    if with_plot and importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot", file=sys.stderr)  # e.g. on a lent GPU machine
        with_plot = False
    if with_plot:
        plot(rows, machine, base + ".png")
        paths.append(base + ".png")
    return paths
