"""python -m fastclip info: which backends are built and usable here, and why not."""

from __future__ import annotations

import argparse
import sys

import torch

import fastclip


def format_info(info: dict) -> str:
    lines = [f"fastclip {fastclip.__version__} with torch {torch.__version__}", ""]
    lines.append(f"{'backend':<8} {'built':<6} {'available':<10} details")
    for name, status in info.items():
        extras = {k: v for k, v in status.items() if k not in ("built", "available", "reason") and v is not None}
        details = status["reason"] or ", ".join(f"{k}={v}" for k, v in extras.items())
        lines.append(f"{name:<8} {status['built']!s:<6} {status['available']!s:<10} {details}")
    lines.append("")
    available = fastclip.available_backends()
    lines.append(f"auto on CPU tensors uses: {next(n for n in available if n in ('cpu', 'torch'))}")
    if torch.cuda.is_available():
        lines.append(f"auto on CUDA tensors uses: {next(n for n in available if n in ('cuda', 'triton', 'torch'))}")
    else:
        lines.append("auto on CUDA tensors uses: (no CUDA device here)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastclip")
    parser.add_argument("command", choices=["info"], help="info: report the backends")
    parser.parse_args(argv)
    print(format_info(fastclip.backend_info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
