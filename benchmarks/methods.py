"""The methods beyond torch's four, as benchmark operations: what fastclip
runs, and what a user runs instead (the baseline each is compared with).

  per-tensor    clip_grad_norm_per_tensor_  vs a loop of torch's clip_grad_norm_([p], m_p)
  range-*       clip_grad_range_            vs a loop of grad.clamp_(lo, hi)
  agc           adaptive_clip_grad_         vs timm.utils.adaptive_clip_grad
  groups        clip_grad_norm_groups_      vs torch's clip_grad_norm_ on each of 3 groups
  stats         grad_stats                  vs torch's _foreach_norm, total, isfinite and zero counts
  zclip         ZClip.step (after warm-up, no spike)      vs zclip.ZClip.step
  autoclip      QuantileClip.step (1000 norms per history) vs autoclip's QuantileClip.step
  amp-clip      unscale_clip_grad_norm_     vs scaler.unscale_ + clip_grad_norm_ (clipping)
  step-clip     clip_grad_norm_into_step_ + fused AdamW step   vs clip_grad_norm_ + fused AdamW step
  step-amp      the same with a GradScaler  vs unscale_ + clip_grad_norm_ + scaler.step (fused AdamW)

The two clippers keep state: each implementation gets its own, started from
the same statistics (clippers(): a ZClip past its warm-up whose mean and
variance make the grads no spike, QuantileClips whose histories make one
tensor in eight clip), and every timed call is one more step.
"""

from __future__ import annotations

import importlib.util
import os

import torch

import fastclip

# Who does the work: the baseline, or fastclip with a backend (harness.implementations).


class Baseline:
    """What a user runs without fastclip: torch.nn.utils and loops, timm's AGC."""

    def __init__(self):
        self._timm = None

    # torch's four
    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def clip_grad_value_(self, params, clip_value):
        return torch.nn.utils.clip_grad_value_(params, clip_value)

    # the methods
    def per_tensor(self, params, max_norms):
        return [torch.nn.utils.clip_grad_norm_([p], m) for p, m in zip(params, max_norms)]

    def value_range(self, params, lo, hi):
        for p in params:
            p.grad.clamp_(lo, hi)

    def agc(self, params, clip_factor):
        timm = self.timm()
        if timm is None:
            raise RuntimeError("timm is not installed (pip install --no-deps timm)")
        timm.adaptive_clip_grad(params, clip_factor)

    def groups(self, groups, max_norm):
        return [torch.nn.utils.clip_grad_norm_(g, max_norm) for g in groups]

    def stats(self, params):
        grads = [p.grad for p in params]
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms))
        nonfinite = sum((~torch.isfinite(g)).sum() for g in grads)
        zeros = sum((g == 0).sum() for g in grads)
        return total, norms, nonfinite, zeros

    def zclip(self, params, state):
        return state.get(self, params)[0].step(state.module)

    def autoclip(self, params, state):
        return state.get(self, params)[1].step()

    def amp_clip(self, params, steps):
        scaler, sgd, _adam = steps.get(self)
        scaler.unscale_(sgd)
        return torch.nn.utils.clip_grad_norm_(params, steps.max_norm)

    def step_clip(self, params, steps, scaled):
        scaler, _sgd, adam = steps.get(self)
        if scaled:
            scaler.unscale_(adam)
            torch.nn.utils.clip_grad_norm_(params, steps.max_norm)
            scaler.step(adam)
        else:
            torch.nn.utils.clip_grad_norm_(params, steps.max_norm * steps.scale)
            adam.step()

    def timm(self):
        """timm's utils/agc.py, loaded by file (timm itself needs torchvision), or None."""
        if self._timm is None:
            spec = importlib.util.find_spec("timm")
            if spec is None or not spec.submodule_search_locations:
                return None
            path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "agc.py")
            module_spec = importlib.util.spec_from_file_location("_timm_agc_bench", path)
            self._timm = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(self._timm)
        return self._timm


class Fastclip:
    """fastclip's functions with a fixed backend, shaped like Baseline."""

    def __init__(self, backend: str):
        self.backend = backend

    def clip_grad_norm_(self, params, max_norm):
        return fastclip.clip_grad_norm_(params, max_norm, backend=self.backend)

    def clip_grad_value_(self, params, clip_value):
        return fastclip.clip_grad_value_(params, clip_value, backend=self.backend)

    def per_tensor(self, params, max_norms):
        return fastclip.clip_grad_norm_per_tensor_(params, max_norms, backend=self.backend)

    def value_range(self, params, lo, hi):
        return fastclip.clip_grad_range_(params, lo, hi, backend=self.backend)

    def agc(self, params, clip_factor):
        return fastclip.adaptive_clip_grad_(params, clip_factor, backend=self.backend)

    def groups(self, groups, max_norm):
        return fastclip.clip_grad_norm_groups_(groups, max_norm, backend=self.backend)

    def stats(self, params):
        return fastclip.grad_stats(params, backend=self.backend)

    def zclip(self, params, state):
        return state.get(self, params)[0].step(params)

    def autoclip(self, params, state):
        return state.get(self, params)[1].step()

    def amp_clip(self, params, steps):
        scaler, sgd, _adam = steps.get(self)
        return fastclip.unscale_clip_grad_norm_(scaler, sgd, steps.max_norm, backend=self.backend)

    def step_clip(self, params, steps, scaled):
        scaler, _sgd, adam = steps.get(self)
        if scaled:
            fastclip.clip_grad_norm_into_step_(adam, steps.max_norm, scaler=scaler, backend=self.backend)
            scaler.step(adam)
        else:
            fastclip.clip_grad_norm_into_step_(adam, steps.max_norm * steps.scale, backend=self.backend)
            adam.step()


class TrainingSteps:
    """Per implementation a GradScaler (scale 2^16: the grads stand for scaled
    ones), an SGD optimizer (unscale_ only) and a fused AdamW over the
    parameters; each call starts from a fresh scaler stage.  max_norm: half the
    norm of the unscaled grads (every call clips)."""

    scale = 2.0**16

    def __init__(self, params, total_norm: float):
        self.params = params
        self.max_norm = total_norm / self.scale / 2
        self._made: dict = {}
        self.plain = torch.optim.AdamW(params, lr=1e-9, fused=True)  # the floor: a fused step alone

    def get(self, impl):
        made = self._made.get(impl)
        if made is None:
            device = self.params[0].device
            scaler = torch.amp.GradScaler(device.type, init_scale=self.scale)
            made = self._made[impl] = (scaler, torch.optim.SGD(self.params, lr=1e-9),
                                       torch.optim.AdamW(self.params, lr=1e-9, fused=True))  # fmt: skip
        scaler = made[0]
        scaler._per_optimizer_states.clear()  # a new iteration: stage READY for every optimizer
        scaler.scale(torch.ones((), device=self.params[0].device))
        return made

    def plain_step(self):
        self.plain.step()


class Clippers:
    """Per implementation, a (ZClip, QuantileClip) pair started from the same state."""

    def __init__(self, params, norms):
        self.module = torch.nn.ParameterList(params)  # zclip's step takes a module
        total = sum(n * n for n in norms) ** 0.5
        self.zclip_state = {"mean": 0.9 * total, "var": (0.2 * total) ** 2}  # z = 0.5: no spike
        gen = torch.Generator().manual_seed(0)
        factors = [0.5 if i % 8 == 7 else 2.0 for i in range(len(norms))]  # one tensor in eight clips
        device = params[0].grad.device
        self.histories = {
            "state": {
                i: {"history": (n * f * (0.9 + 0.2 * torch.rand(1000, generator=gen))).float().to(device)}
                for i, (n, f) in enumerate(zip(norms, factors))
            },
            "param_groups": [{"quantile": 0.9, "history_length": 1000, "params": list(range(len(norms)))}],
        }
        self._made: dict = {}

    def get(self, impl, params):
        if impl not in self._made:
            self._made[impl] = self._make(impl, params)
        return self._made[impl]

    def _make(self, impl, params):
        mean, var = self.zclip_state["mean"], self.zclip_state["var"]
        if isinstance(impl, Fastclip):
            zc = fastclip.ZClip(max_grad_norm=None, backend=impl.backend)
            zc.load_state_dict({**zc.state_dict(), "steps": 0, "buffer": None,
                                "mean": torch.tensor(mean, dtype=torch.float64),
                                "var": torch.tensor(var, dtype=torch.float64)})  # fmt: skip
            qc = fastclip.QuantileClip(params, backend=impl.backend)
        else:
            import zclip
            from autoclip.torch import QuantileClip

            zc = zclip.ZClip(max_grad_norm=None)
            zc.mean, zc.var, zc.initialized = mean, var, True
            qc = QuantileClip(params)
        qc.load_state_dict(self.histories)
        return zc, qc


def method_stats(params) -> dict:
    """What the method cases need to know of the grads: every grad's norm, a
    per-tensor max norm under which one tensor in eight clips, three groups,
    and an AGC clip factor under which about one unit in ten clips."""
    grads = [p.grad for p in params]
    norms = [torch.linalg.vector_norm(g.float()).item() for g in grads]
    max_norms = [n * (0.5 if i % 8 == 7 else 2.0) for i, n in enumerate(norms)]
    third = max(1, len(params) // 3)
    groups = [params[:third], params[third : 2 * third], params[2 * third :]]
    ratios = []
    for p in params:
        w, g = p.detach().float(), p.grad.float()
        if g.dim() <= 1 or g.shape[0] <= 1:
            ratios.append((g.norm() / w.norm().clamp(min=1e-3)).reshape(1))
        else:
            ratios.append(g.flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1).clamp(min=1e-3))
    clip_factor = torch.quantile(torch.cat(ratios)[:1_000_000].cpu(), 0.9).item()
    total = sum(n * n for n in norms) ** 0.5
    return {"max_norms": max_norms, "groups": groups, "clip_factor": clip_factor, "clippers": Clippers(params, norms),
            "steps": TrainingSteps(params, total)}  # fmt: skip
