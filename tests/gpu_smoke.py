"""python -m tests.gpu_smoke: every GPU kernel once per dtype and norm type,
on odd sizes, against torch (torch's four functions, then every segmented
method), in one short process: what `.ci/gpu quick`
runs under compute-sanitizer (memcheck), where a pytest session would take
too long.  Exits 1 on a wrong result, 0 otherwise; prints one line per check.

Sizes cross the units of both GPU backends (Triton: 8192 elements, CUDA:
16384) and leave short, unaligned tails; a 16-byte-misaligned view and an
empty grad are among them.

`--device cpu` runs the same checks here, without a GPU, through Triton's
interpreter and the CUDA emulation (so the script itself is tested before
a lease is spent on it).
"""

from __future__ import annotations

import math
import sys

import os

import torch

if sys.argv[1:] == ["--device", "cpu"]:  # before fastclip and triton are imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FASTCLIP_CUDA_EMULATE"] = "1"

import fastclip  # noqa: E402

SIZES = [1, 0, 4099, 8192, 8193, 16383, 3 * 16384 + 9, 100_003]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _grads(dtype, gen):
    # N(0, 1e-2): no fp16 norm overflows
    grads = [torch.randn(n, generator=gen, device=gen.device, dtype=torch.float64).mul(1e-2).to(dtype) for n in SIZES]
    base = torch.randn(5001, generator=gen, device=gen.device).mul(1e-2).to(dtype)
    grads.append(base[1:])  # misaligned start: the kernels' scalar paths
    return grads


def _params(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def check(backend: str, gen) -> list[str]:
    failures = []
    for dtype in DTYPES:
        grads = _grads(dtype, gen)
        for norm_type in (1.0, 2.0, math.inf):
            usable = [g for g in grads if g.numel() or norm_type != math.inf]
            ours, ref = _params(usable), _params(usable)
            total = fastclip.clip_grad_norm_(ours, 0.01, norm_type, backend=backend)  # every norm clips
            want = torch.nn.utils.clip_grad_norm_(ref, 0.01, norm_type)
            rel = abs(total.double().item() - want.double().item()) / max(want.double().item(), 1e-30)
            close = all(
                torch.allclose(p.grad.double(), q.grad.double(), rtol=2e-2, atol=1e-6) for p, q in zip(ours, ref)
            )
            tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
            ok = rel <= tol and close
            print(f"{backend:6} {str(dtype):15} clip_grad_norm_ p={norm_type}: rel {rel:.1e} {'ok' if ok else 'WRONG'}")
            if not ok:
                failures.append(f"{backend} {dtype} norm {norm_type}")
        ours, ref = _params(grads), _params(grads)
        fastclip.clip_grad_value_(ours, 0.01, backend=backend)  # about a third of the values change
        torch.nn.utils.clip_grad_value_(ref, 0.01)
        ok = all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref))
        print(f"{backend:6} {str(dtype):15} clip_grad_value_: {'ok' if ok else 'WRONG'}")
        if not ok:
            failures.append(f"{backend} {dtype} value")
    return failures


def check_methods(backend: str, gen) -> list[str]:
    """The segmented methods once each per dtype, against plain torch (loose
    tolerances: fastclip's norms are more accurate than torch's in fp16/bf16)."""
    def timm_agc(params, clip_factor, eps):  # timm.utils.agc.adaptive_clip_grad's formula (2-norm)
        for p in params:
            dim = tuple(range(1, p.ndim)) if p.ndim > 1 else None
            max_norm = p.detach().norm(2.0, dim=dim, keepdim=p.ndim > 1).clamp_(min=eps).mul_(clip_factor)
            grad_norm = p.grad.detach().norm(2.0, dim=dim, keepdim=p.ndim > 1)
            clipped = p.grad.detach() * (max_norm / grad_norm.clamp(min=1e-6))
            p.grad.detach().copy_(torch.where(grad_norm < max_norm, p.grad.detach(), clipped))

    failures = []
    for dtype in DTYPES:
        grads = _grads(dtype, gen)
        shapes = [(37, 41), (5, 3, 3, 3), (1, 300)]
        weights = [torch.randn(s, generator=gen, device=gen.device).to(dtype) for s in shapes]
        mats = [torch.randn(s, generator=gen, device=gen.device).mul(1e-2).to(dtype) for s in shapes]
        tol = dict(rtol=2e-2, atol=1e-6) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-9)
        results = {}
        ours, ref = _params(grads), _params(grads)
        norms = fastclip.clip_grad_norm_per_tensor_(ours, 0.01, backend=backend)
        want = torch.stack([torch.nn.utils.clip_grad_norm_([q], 0.01) for q in ref]).to(norms.dtype)
        results["per_tensor"] = torch.allclose(norms.double(), want.double(), **tol) and all(
            torch.allclose(a.grad.double(), b.grad.double(), **tol) for a, b in zip(ours, ref)
        )
        ours, ref = _params(grads), _params(grads)
        got = fastclip.clip_grad_norm_groups_([ours[:4], ours[4:]], [0.02, 0.005], backend=backend)
        want = torch.stack([torch.nn.utils.clip_grad_norm_(ref[:4], 0.02), torch.nn.utils.clip_grad_norm_(ref[4:], 0.005)])
        results["groups"] = torch.allclose(got.double(), want.double(), **tol) and all(
            torch.allclose(a.grad.double(), b.grad.double(), **tol) for a, b in zip(ours, ref)
        )
        ours, ref = _params(grads), _params(grads)
        fastclip.clip_grad_range_(ours, -0.01, 0.005, backend=backend)
        results["range"] = all(torch.equal(a.grad, b.grad.clamp(-0.01, 0.005)) for a, b in zip(ours, ref))
        stats = fastclip.grad_stats(_params(grads), backend=backend)
        results["stats"] = bool(stats.num_zeros.item() == sum(int((g == 0).sum()) for g in grads)) and abs(
            stats.total_norm.double().item() - torch.nn.utils.get_total_norm([g.double() for g in grads]).item()
        ) <= 2e-2 * max(stats.total_norm.double().item(), 1e-30)
        ours, ref = _params(mats), _params(mats)
        for a, b, w in zip(ours, ref, weights):
            a.data, b.data = w.clone(), w.clone()
        fastclip.adaptive_clip_grad_(ours, 0.005, backend=backend)
        timm_agc(ref, 0.005, 1e-3)
        results["agc"] = all(torch.allclose(a.grad.double(), b.grad.double(), **tol) for a, b in zip(ours, ref))
        results["zclip"] = results["quantile_clip"] = True
        zc = fastclip.ZClip(warmup_steps=2, backend=backend)
        qc, qref = fastclip.QuantileClip(ours := _params(grads), history_length=3, backend=backend), _params(grads)
        for step in range(4):  # warm-up, initialization, two steps after; histories fill
            scale = 50.0 if step == 3 else 1.0
            for a, b, g in zip(ours, qref, grads):
                a.grad, b.grad = g * scale, g * scale
            total = zc.step(ours)  # ZClip, then QuantileClip on what it left
            want = torch.nn.utils.get_total_norm([b.grad for b in qref])
            results["zclip"] &= abs(total.double().item() - want.double().item()) <= 2e-2 * want.double().item()
            qc.step()
        # the x50 step clipped (its norm before clipping, and after: the coefficient's share)
        spiked = bool(zc.last_clipped.item()) and float(zc.last_coef) < 0.5
        results["zclip"] &= spiked and bool(zc.initialized and torch.isfinite(zc.mean).item())
        results["quantile_clip"] = bool(torch.isfinite(qc.last_thresholds).all().item())
        for name, ok in results.items():
            print(f"{backend:6} {str(dtype):15} {name}: {'ok' if ok else 'WRONG'}")
            if not ok:
                failures.append(f"{backend} {dtype} {name}")
    return failures


def main(argv: list[str]) -> int:
    device = "cpu" if argv[1:] == ["--device", "cpu"] else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator(device).manual_seed(0)
    failures = []
    for backend in ("cuda", "triton"):
        if backend not in fastclip.available_backends():
            print(f"{backend}: not available ({fastclip.backend_info()[backend]['reason']})")
            failures.append(f"{backend} unavailable")
            continue
        failures += check(backend, gen)
        failures += check_methods(backend, gen)
    if device == "cuda":
        torch.cuda.synchronize()
    print("FAILED: " + "; ".join(failures) if failures else "all ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
