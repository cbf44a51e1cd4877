"""A 0-dim grad narrower than float64 beside a float64 grad, on every backend.

torch multiplies a grad by the 0-dim coefficient in the grad's own precision,
except where both are 0-dim: they promote, so a float32 (or fp16, bf16) 0-dim
grad times a float64 coefficient is computed in float64 and rounded once.
The kernels multiply every grad in its own precision, so these calls leave
the multiply to torch (fastclip's norms, torch's products): the grads must be
torch's bits.  (A 0-dim float32 parameter, a logit scale or a temperature,
beside float64 ones.)
"""

from __future__ import annotations

import pytest
import torch

import fastclip

from .helpers import assert_bitwise_equal, assert_grads_bitwise_equal, check_clip_grad_norm, clone_params
from .method_refs import clip_like_torch, random_params

NARROW = [torch.float32, torch.float16, torch.bfloat16]


def mixed_params(scale=1.0):
    """0-dim grads of every narrow dtype beside float64 and float32 tensors; many
    values, so a product that rounds differently from float64 shows up."""
    shapes = [(), (5,), (), (3, 4), (), (7,)]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.float32, torch.bfloat16, torch.float64]
    params = []
    for _ in range(8):
        params += [random_params([s], [d], scale=scale)[0] for s, d in zip(shapes, dtypes)]
    return params


def test_clip_grad_norm(backend, seed):
    check_clip_grad_norm(mixed_params(), backend, 0.1)  # grads: torch's clip with our total (float64)


@pytest.mark.parametrize("total_dtype", [torch.float64, torch.float32])
def test_clip_grads_with_norm(backend, total_dtype, seed):
    params = mixed_params()
    ours, ref = clone_params(params), clone_params(params)
    total = torch.tensor(37.3, dtype=total_dtype)
    fastclip.clip_grads_with_norm_(ours, 0.7, total, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(ref, 0.7, total)
    assert_grads_bitwise_equal(ours, ref)


def test_norm_groups(backend, seed):
    params = mixed_params()
    groups = [params[:6], params[6:12] + params[14:15], [params[12], params[13]] + params[15:]]
    ours = [clone_params(g) for g in groups]
    norms = fastclip.clip_grad_norm_groups_(ours, 0.1, backend=backend)
    for k, group in enumerate(groups):
        ref = clone_params(group)
        wide = any(p.grad.dtype == torch.float64 for p in group)
        clip_like_torch([p.grad for p in ref], norms[k].to(torch.float64 if wide else torch.float32), 0.1)
        assert_grads_bitwise_equal(ours[k], ref)


def test_unscale_clip_grad_norm_is_torchs_recipe(backend, seed):
    params = [p for p in mixed_params(1000.0) if p.dtype != torch.float16]  # GradScaler refuses fp16 grads

    def run(how):
        ps = clone_params(params)
        opt = torch.optim.SGD(ps, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(torch.ones(()))  # makes the scale
        if how == "torch":  # torch's recipe, with fastclip's norm
            scaler.unscale_(opt)
            norm = fastclip.get_total_norm([p.grad for p in ps], backend=backend)
            torch.nn.utils.clip_grads_with_norm_(ps, 0.5, norm)
        else:
            norm = fastclip.unscale_clip_grad_norm_(scaler, opt, 0.5, backend=backend)
        return ps, norm

    (ours, norm), (ref, want) = run("fastclip"), run("torch")
    assert_bitwise_equal(norm, want)
    assert_grads_bitwise_equal(ours, ref)


def test_quantile_clip_global(backend, seed):
    """Global mode clips as torch's clip_grad_norm_(max_norm=threshold): a tensor coefficient."""
    params = mixed_params()
    ours = clone_params(params)
    clip = fastclip.QuantileClip(ours, quantile=0.5, history_length=4, global_threshold=True, backend=backend)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours, params):
            p.grad = (torch.randn(q.shape, generator=g, dtype=torch.float64) * (1 + 9 * (step == 3))).to(q.dtype)
        before = [p.grad.clone() for p in ours]
        clip.step()
        total, threshold = clip.last_norms, clip.last_thresholds
        coef = torch.clamp((total + 1e-6).reciprocal() * threshold.to(total.dtype), max=1.0)
        for p, b in zip(ours, before):
            assert_bitwise_equal(p.grad, b.mul_(coef))


def test_zclip_multiplies_as_zclip_does(backend, seed):
    """zclip multiplies by a Python float: no promotion, float32(coef) for every narrower grad."""
    params = mixed_params()
    ours = clone_params(params)
    clip = fastclip.ZClip(warmup_steps=2, backend=backend)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours, params):
            p.grad = (torch.randn(q.shape, generator=g, dtype=torch.float64) * (1 + 99 * (step == 4))).to(q.dtype)
        before = [p.grad.clone() for p in ours]
        clip.step(ours)
        if step >= 2:
            coef = float(clip.last_coef)
            for p, b in zip(ours, before):
                assert_bitwise_equal(p.grad, b.mul_(coef))
    assert bool(clip.last_clipped)
