"""Realistic gradient layouts: the parameter shapes of real models.

Each layout is a list of (shape, role) where role is "weight" or "small"
(biases, norms, positions): the mixed-precision layout keeps small tensors
in float32 and weights in bfloat16, as AMP-style training does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    shapes: tuple  # ((shape, role), ...)

    @property
    def numel(self) -> int:
        return sum(torch.Size(s).numel() for s, _ in self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def gpt2_small() -> Layout:
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [((vocab, d), "weight"), ((ctx, d), "small")]
    for _ in range(layers):
        shapes += [
            ((d,), "small"),
            ((d,), "small"),  # ln_1
            ((d, 3 * d), "weight"),
            ((3 * d,), "small"),  # attn.c_attn
            ((d, d), "weight"),
            ((d,), "small"),  # attn.c_proj
            ((d,), "small"),
            ((d,), "small"),  # ln_2
            ((d, 4 * d), "weight"),
            ((4 * d,), "small"),  # mlp.c_fc
            ((4 * d, d), "weight"),
            ((d,), "small"),  # mlp.c_proj
        ]
    shapes += [((d,), "small"), ((d,), "small")]  # ln_f
    return Layout("gpt2-small", "GPT-2 small: 148 tensors, 124M elements", tuple(shapes))


def llama_blocks(blocks: int = 8, d: int = 1024, hidden: int = 2816, kv: int = 256, vocab: int = 32000) -> Layout:
    shapes = [((vocab, d), "weight")]
    for _ in range(blocks):
        shapes += [
            ((d,), "small"),  # input RMSNorm
            ((d, d), "weight"),
            ((kv, d), "weight"),
            ((kv, d), "weight"),
            ((d, d), "weight"),  # q, k, v, o (GQA)
            ((d,), "small"),  # post-attention RMSNorm
            ((hidden, d), "weight"),
            ((hidden, d), "weight"),
            ((d, hidden), "weight"),  # gate, up, down
        ]
    shapes += [((d,), "small"), ((vocab, d), "weight")]  # final norm, lm_head
    n = len(shapes)
    return Layout(
        "llama-blocks", f"Llama-style stack ({blocks} blocks, d={d}, GQA, SwiGLU): {n} tensors", tuple(shapes)
    )


def vit_base() -> Layout:
    d, layers, patches = 768, 12, 197
    shapes = [((d, 3, 16, 16), "weight"), ((d,), "small"), ((1, 1, d), "small"), ((1, patches, d), "small")]
    for _ in range(layers):
        shapes += [
            ((d,), "small"),
            ((d,), "small"),
            ((3 * d, d), "weight"),
            ((3 * d,), "small"),
            ((d, d), "weight"),
            ((d,), "small"),
            ((d,), "small"),
            ((d,), "small"),
            ((4 * d, d), "weight"),
            ((4 * d,), "small"),
            ((d, 4 * d), "weight"),
            ((d,), "small"),
        ]
    shapes += [((d,), "small"), ((d,), "small"), ((1000, d), "weight"), ((1000,), "small")]
    return Layout("vit-b16", f"ViT-B/16: {len(shapes)} tensors, 86M elements", tuple(shapes))


def tiny_tensors(count: int = 2000, size: int = 64) -> Layout:
    return Layout(
        f"{count}x{size}", f"{count} tensors of {size} elements (host overhead)", (((size,), "weight"),) * count
    )


def billion(small: int = 100, large: int = 200) -> Layout:
    """The GPU reference workload: 300 tensors, about 1e9 elements, a third of
    them tiny (norms, biases), the rest large matrices."""
    shapes = [((4096,), "small")] * small + [((2048, 2440), "weight")] * large
    return Layout("1B-300", f"{small + large} tensors, about 1e9 elements (GPU reference)", tuple(shapes))


def resnet50() -> Layout:
    """ResNet-50's convolution and linear weights (with its BatchNorm weights and
    biases): the AGC workload of NFNet-style training."""
    shapes = [((64, 3, 7, 7), "weight"), ((64,), "small"), ((64,), "small")]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [((width, inplanes, 1, 1), "weight"), ((width,), "small"), ((width,), "small"),
                       ((width, width, 3, 3), "weight"), ((width,), "small"), ((width,), "small"),
                       ((out, width, 1, 1), "weight"), ((out,), "small"), ((out,), "small")]  # fmt: skip
            if b == 0:
                shapes += [((out, inplanes, 1, 1), "weight"), ((out,), "small"), ((out,), "small")]
            inplanes = out
    shapes += [((1000, 2048), "weight"), ((1000,), "small")]
    layout = Layout("resnet50", "", tuple(shapes))
    return Layout("resnet50", f"ResNet-50: {len(shapes)} tensors, {layout.numel / 1e6:.1f}M elements", tuple(shapes))


LAYOUTS = {f.__name__: f for f in (gpt2_small, llama_blocks, vit_base, tiny_tensors, billion, resnet50)}


def fill_random(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill `t` with N(0, 1e-2) values, in chunks: randn of a whole 40M-element
    tensor in float64 would need 300 MB.  Returns `t`.  `gen` is on t's
    device (a CPU generator for CUDA tensors would make 1e9 values on the host)."""
    flat = t.view(-1)
    for start in range(0, flat.numel(), 1 << 22):
        stop = min(start + (1 << 22), flat.numel())
        flat[start:stop] = torch.randn(stop - start, generator=gen, device=gen.device).mul_(1e-2).to(t.dtype)
    return t


def make_grads(layout: Layout, dtype: str, device="cpu", seed: int = 0):
    """Parameters with random weights N(0, 0.05^2) and grads N(0, 1e-2^2).
    dtype "mixed": weights bfloat16, small tensors float32."""
    gen = torch.Generator(device).manual_seed(seed)
    params = []
    for shape, role in layout.shapes:
        if dtype == "mixed":
            dt = torch.bfloat16 if role == "weight" else torch.float32
        else:
            dt = getattr(torch, dtype)
        p = torch.nn.Parameter(fill_random(torch.empty(shape, dtype=dt, device=device), gen).mul_(5.0))
        p.grad = fill_random(torch.empty(shape, dtype=dt, device=device), gen)
        params.append(p)
    return params
