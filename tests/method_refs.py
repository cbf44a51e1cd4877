"""Plain-torch references for the segmented methods (fastclip/methods/), and
what their tests share.

Fused backends accumulate norms in float64 (fp16/bf16 in float32 per unit)
and work a segment's coefficient in float32 (float64 for float64 tensors)
from that norm; the references here do the same with torch ops on float64
norms, so a fused result can be checked bit for bit.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .helpers import interpreted

F64 = torch.float64


def norm64(t: torch.Tensor, p: float, dim=None) -> torch.Tensor:
    """The p-norm in float64 (over `dim`, or all elements), torch's semantics for NaN."""
    x = t.detach().to(F64)
    if dim is None:
        return torch.linalg.vector_norm(x.reshape(-1), p)
    return torch.linalg.vector_norm(x, p, dim=dim, keepdim=True)


def working(norm64_value: torch.Tensor, wide: bool) -> torch.Tensor:
    """A float64 norm as a segment works with it: float64, or float32."""
    return norm64_value if wide else norm64_value.to(torch.float32)


def norms_dtype(grads) -> torch.dtype:
    return F64 if any(g.dtype == F64 for g in grads) else torch.float32


def clip_like_torch(grads, norm: torch.Tensor, max_norm) -> None:
    """torch's clip_grads_with_norm_ on `grads` with the total `norm` (its dtype decides the coefficient's)."""
    holders = [_Holder(g) for g in grads]
    torch.nn.utils.clip_grads_with_norm_(holders, max_norm, norm)


class _Holder:
    def __init__(self, grad):
        self.grad = grad


def agc_reference(pairs, clip_factor, eps, p) -> list:
    """AGC with float64 norms: timm's formula in float32 (float64 for float64
    tensors) from them; returns the new grads (the inputs are left alone)."""
    out = []
    for w, g in pairs:
        wide = w.dtype == F64 or g.dtype == F64
        math_dtype = F64 if wide else torch.float32
        dim = None if g.dim() <= 1 else tuple(range(1, g.dim()))
        wn = working(norm64(w, p, dim), wide)
        gn = working(norm64(g, p, dim), wide)
        m = wn.clamp(min=torch.tensor(eps, dtype=math_dtype)) * torch.tensor(clip_factor, dtype=math_dtype)
        coef = m / gn.clamp(min=torch.tensor(1e-6, dtype=math_dtype))
        scaled = (g.to(math_dtype) * coef).to(g.dtype)
        out.append(torch.where(gn < m, g, scaled))
    return out


def load_timm_agc():
    """timm's utils/agc.py, loaded by file (importing timm needs torchvision,
    which does not import beside the CPU torch wheel), or None."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "agc.py")
    if not os.path.exists(path):
        return None
    module_spec = importlib.util.spec_from_file_location("_timm_agc_for_tests", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def sizes_for(backend: str, big: int = 3000) -> list[int]:
    """Grad sizes around the units of every backend; small under interpretation."""
    if interpreted(backend):
        return [1, 7, 600, 1025, 0, 3]
    return [1, 7, 600, big, 33_000, 0, 70_001]


def clipper_shapes(backend: str) -> list[tuple]:
    """Parameter shapes for the stateful clippers' runs (ZClip, QuantileClip):
    a matrix, a vector, a scalar, an empty tensor, larger ones off the interpreter."""
    if interpreted(backend):
        return [(7, 5), (9,), (), (0, 3), (40,)]
    return [(64, 33), (33,), (), (0, 3), (5, 1000), (3000,)]


def random_params(shapes, dtypes, generator=None, scale=1.0, with_none=()):
    """Parameters (random weights) with random grads; indices in with_none get no grad."""
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.randn(shape, dtype=F64, generator=generator).to(dtype))
        if i not in with_none:
            p.grad = (torch.randn(shape, dtype=F64, generator=generator) * scale).to(dtype)
        params.append(p)
    return params
