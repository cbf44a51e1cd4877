"""Train a small GPT on synthetic data with gradient clipping by torch (or the
library a method comes from) or by fastclip, and show that the loss curves
are the same and what clipping costs.

    python examples/train_gpt.py --compare              # torch vs fastclip, same init and data
    python examples/train_gpt.py --clip-backend auto    # fastclip only
    python examples/train_gpt.py --clip zclip --compare # fastclip.ZClip vs zclip.ZClip
    python examples/train_gpt.py --clip into-step --amp --compare
    python examples/train_gpt.py --device cuda --dtype bfloat16 --layers 12 --d-model 768 --compare

--clip picks the method (the reference run of --compare in brackets):
  norm        clip_grad_norm_                          [torch.nn.utils.clip_grad_norm_]
  per-tensor  clip_grad_norm_per_tensor_               [torch's clip_grad_norm_([p]) for each p]
  agc         adaptive_clip_grad_ (clip factor 0.01)   [timm.utils.adaptive_clip_grad]
  zclip       fastclip.ZClip(warmup_steps=5, no cap)   [zclip.ZClip]
  autoclip    fastclip.QuantileClip(quantile=0.9)      [autoclip.torch.QuantileClip]
  into-step   clip_grad_norm_into_step_ + fused AdamW  [clip_grad_norm_ + fused AdamW]
--amp scales the loss with a GradScaler (fastclip: unscale_clip_grad_norm_
for norm, the scaler handed to clip_grad_norm_into_step_ for into-step;
otherwise scaler.unscale_ first, on both sides).

The data needs no download: sequences follow a fixed random permutation of
the vocabulary (token t+1 = perm[token t]), with 10% of tokens replaced by
noise, so the loss falls quickly and then plateaus.  The clip step is timed
on its own (with a device sync around it on CUDA) and reported as
milliseconds per step and as a share of the whole step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastclip

# ---------------------------------------------------------------- the model


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def synthetic_batches(vocab: int, seq: int, batch: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    while True:
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (batch,), generator=g)
        for i in range(seq):
            tokens[:, i + 1] = perm[tokens[:, i]]
        noise = torch.rand(batch, seq + 1, generator=g) < 0.1
        tokens[noise] = torch.randint(vocab, (int(noise.sum()),), generator=g)
        tokens = tokens.to(device)
        yield tokens[:, :-1], tokens[:, 1:]


# ---------------------------------------------------------------- training


METHODS = ["norm", "per-tensor", "agc", "zclip", "autoclip", "into-step"]


# no fixed cap (max_grad_norm=None): ZClip's z-score decides which steps clip (a few
# in the default 60 steps), so --compare checks its adaptive threshold, not --max-norm
ZCLIP_SETTINGS = {"warmup_steps": 5, "max_grad_norm": None}


def clip_function(backend: str, patch: bool):
    """torch's clip_grad_norm_, or fastclip's (named directly, or reached
    through torch.nn.utils after fastclip.patch())."""
    if backend == "torch":
        return torch.nn.utils.clip_grad_norm_
    if patch:
        return lambda params, max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm)
    return lambda params, max_norm: fastclip.clip_grad_norm_(params, max_norm, backend=backend)


@contextlib.contextmanager
def patched_on(backend: str):
    """fastclip.patched(), the patched functions on `backend` ($FASTCLIP_BACKEND, read at each call)."""
    before = os.environ.get("FASTCLIP_BACKEND")
    os.environ["FASTCLIP_BACKEND"] = backend
    try:
        with fastclip.patched():
            yield
    finally:
        if before is None:
            del os.environ["FASTCLIP_BACKEND"]
        else:
            os.environ["FASTCLIP_BACKEND"] = before


def _timm_agc():
    """timm's utils/agc.py, loaded by file (timm itself needs torchvision)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("timm")
    if spec is None:
        raise SystemExit("--clip agc --compare needs timm (pip install --no-deps timm)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "agc.py")
    module_spec = importlib.util.spec_from_file_location("_timm_agc", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.adaptive_clip_grad


def make_clip(args, backend: str, model, opt, scaler):
    """clip() for the training loop: runs after backward (the loss scaled if
    `scaler`), leaves the grads ready for the step, returns the norm or None."""
    params = list(model.parameters())
    method, ours = args.clip, backend != "torch"

    def unscaled(fn):  # the method on unscaled grads: GradScaler's unscale_ first
        def run():
            if scaler is not None:
                scaler.unscale_(opt)
            return fn()

        return run

    if method == "norm":
        if ours and scaler is not None:
            return lambda: fastclip.unscale_clip_grad_norm_(scaler, opt, args.max_norm, backend=backend)
        clip = clip_function(backend, args.patch)
        return unscaled(lambda: clip(params, args.max_norm))
    if method == "into-step":
        if ours:
            return lambda: fastclip.clip_grad_norm_into_step_(opt, args.max_norm, scaler=scaler, backend=backend)
        return unscaled(lambda: torch.nn.utils.clip_grad_norm_(params, args.max_norm))
    if method == "per-tensor":
        if ours:
            return unscaled(lambda: fastclip.clip_grad_norm_per_tensor_(params, args.max_norm, backend=backend).norm())
        return unscaled(lambda: torch.stack([torch.nn.utils.clip_grad_norm_([p], args.max_norm) for p in params]).norm())
    if method == "agc":
        if ours:
            return unscaled(lambda: fastclip.adaptive_clip_grad_(params, 0.01, backend=backend))
        agc = _timm_agc()
        return unscaled(lambda: agc(params, 0.01))
    if method == "zclip":
        if ours:
            z = fastclip.ZClip(**ZCLIP_SETTINGS, backend=backend)
            return unscaled(lambda: z.step(params))
        import zclip

        z = zclip.ZClip(**ZCLIP_SETTINGS)
        return unscaled(lambda: z.step(model))
    if method == "autoclip":
        if ours:
            q = fastclip.QuantileClip(params, quantile=0.9, history_length=1000, backend=backend)
        else:
            from autoclip.torch import QuantileClip

            q = QuantileClip(params, quantile=0.9, history_length=1000)
        return unscaled(q.step)
    raise ValueError(f"unknown --clip {method!r}")


def train(args, backend: str) -> dict:
    """Train from the seed's initial weights; returns losses, norms and timings."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = GPT(args.vocab, args.seq, args.d_model, args.layers, args.heads).to(device, dtype)
    fused = {"fused": True} if args.clip == "into-step" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, **fused)
    params = list(model.parameters())
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12) if args.amp else None
    clip = make_clip(args, backend, model, opt, scaler)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = synthetic_batches(args.vocab, args.seq, args.batch, args.seed, device)
    losses, norms, clip_s, step_s = [], [], [], []
    with patched_on(backend) if args.patch and backend != "torch" else contextlib.nullcontext():
        for _ in range(args.steps):
            x, y = next(batches)
            sync()
            start = time.perf_counter()
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            sync()
            clip_start = time.perf_counter()
            total = clip()
            sync()
            clip_s.append(time.perf_counter() - clip_start)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sync()
            step_s.append(time.perf_counter() - start)
            losses.append(loss.item())
            norms.append(math.nan if total is None else float(total))
    return {"losses": losses, "norms": norms, "clip_s": clip_s, "step_s": step_s,
            "grads": len(params), "elements": sum(p.numel() for p in params)}  # fmt: skip


def _median_ms(xs) -> float:
    xs = sorted(xs[1:] or xs)  # the first step warms up
    return 1e3 * xs[len(xs) // 2]


def report(runs: dict, every: int) -> None:
    names = list(runs)
    first = runs[names[0]]
    print(f"{first['grads']} parameter tensors, {first['elements'] / 1e6:.2f} M elements")
    width = max(18, *(len(n) + 7 for n in names))  # ("loss " + name, and a space between columns)
    header = "step " + "".join(f"{'loss ' + n:>{width}}{'norm ' + n:>{width}}" for n in names)
    print(header)
    steps = len(first["losses"])
    for i in range(steps):
        if i % every == 0 or i == steps - 1:
            row = "".join(f"{runs[n]['losses'][i]:>{width}.6f}{runs[n]['norms'][i]:>{width}.6f}" for n in names)
            print(f"{i:>4} " + row)
    for n in names:
        clip_ms, step_ms = _median_ms(runs[n]["clip_s"]), _median_ms(runs[n]["step_s"])
        print(
            f"{n:>10}: clip {clip_ms:8.3f} ms/step (median), {100 * clip_ms / step_ms:5.2f}% of a {step_ms:.1f} ms step"
        )
    if len(names) == 2:
        a, b = (runs[n]["losses"] for n in names)
        if not all(map(math.isfinite, a + b)):  # (max() would pass over a NaN)
            print("the losses are not all finite: no difference to report")
            return
        diff = max(abs(x - y) for x, y in zip(a, b))
        rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
        print(f"largest loss difference: {diff:.3g} (relative {rel:.3g})")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-backend", default="auto", choices=["auto", "cpu", "cuda", "triton", "torch"],
                        help="fastclip backend, or 'torch' for torch.nn.utils.clip_grad_norm_")  # fmt: skip
    parser.add_argument("--clip", default="norm", choices=METHODS, help="the clipping method (see above)")
    parser.add_argument("--amp", action="store_true", help="scale the loss with a GradScaler (no autocast)")
    parser.add_argument("--compare", action="store_true",
                        help="run the reference (torch, or the method's library) and --clip-backend from the same start")
    parser.add_argument("--patch", action="store_true", help="reach fastclip through fastclip.patch()")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10, help="print every N-th step")
    args = parser.parse_args(argv)
    if args.d_model % args.heads:
        parser.error("--d-model must be a multiple of --heads")
    if not math.isfinite(args.max_norm) or args.max_norm <= 0:
        parser.error("--max-norm must be a positive number")
    if args.amp and args.dtype == "float16":  # GradScaler refuses fp16 grads (AMP keeps fp32 weights)
        parser.error("--amp scales the loss of float32 or bfloat16 weights; GradScaler refuses float16 grads")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    backends = ["torch", args.clip_backend] if args.compare and args.clip_backend != "torch" else [args.clip_backend]
    reference = {"zclip": "zclip", "autoclip": "autoclip", "agc": "timm"}.get(args.clip, "torch")
    runs = {(reference if b == "torch" else f"fastclip-{b}"): train(args, b) for b in backends}
    report(runs, args.every)
    return runs


if __name__ == "__main__":
    main()
