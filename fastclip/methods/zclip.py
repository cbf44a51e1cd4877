"""ZClip (Kumar et al. 2025; package `zclip` 1.0.0) with its statistics on the device.

zclip keeps an EMA of the total grad norm's mean and variance in Python
floats and calls `.item()` every step.  Here the same float64 arithmetic,
operation for operation, runs as tensor ops on the grads' device (zclip's
`x ** 2` and `v ** 0.5` are libm's pow, an ulp away from x*x and sqrt(v) for
about one value in a thousand: the statistics agree within that), so a step
never waits for the device: the norm is one fused read, the coefficient is
computed where the norm is, and the grads are scaled only where it is not 1
(the fused scale reads the coefficient on the device).  On the CPU, where the
host is the device and reading a value waits for nothing, the same float64
operations run as Python floats (a dozen float operations instead of dozens
of tensor ops; the same bits, which a test checks).

zclip's step, which this follows:
  warm-up (the first `warmup_steps` steps, at least one): record the norm and
    clip with torch's clip_grad_norm_(max_grad_norm) if that is set; the step
    that fills the record sets mean and variance from it.
  afterwards: std = sqrt(var), z = (norm - mean) / (std + eps);
    zscore mode: a spike is z > z_thresh, clipped to
      (mean + z_thresh * std / (z / z_thresh)) * clip_factor  (adaptive_scaling)
      or mean                                                  ("mean");
    percentile mode: a spike is norm > mean + z_thresh * std, clipped to that;
    the limit is min(spike ? that : norm, max_grad_norm); grads are scaled by
    limit / (norm + 1e-6) when norm > limit;
    mean <- alpha mean + (1 - alpha) x, var <- alpha var + (1 - alpha) (x - mean)^2
    with x the clipped value on a spike, else the norm (no update on a spike
    with skip_update_on_spike).
"""

from __future__ import annotations

import math
import operator

import torch

from .._dispatch import resolve_name
from .._no_grad import no_grad
from ..backends.gpu_common import capturing
from ._whole import WholeNorm, eager_under_compile, params_of

F64 = torch.float64
HOST_DEVICE_TYPES = ("cpu",)  # where the step's arithmetic is done in Python floats (tests clear it)
_CONFIG = (
    "alpha", "z_thresh", "max_grad_norm", "eps", "warmup_steps", "mode", "clip_option", "clip_factor",
    "skip_update_on_spike",
)  # fmt: skip


class _TENSORS:
    """Float64 0-dim tensors on the grads' device."""

    sqrt = staticmethod(torch.sqrt)
    div = staticmethod(operator.truediv)
    where = staticmethod(torch.where)


class _FLOATS:
    """Python floats, with IEEE results where Python raises (x / 0, sqrt(-x))."""

    @staticmethod
    def sqrt(x: float) -> float:
        return math.sqrt(x) if x >= 0 else math.nan  # (-0.0 >= 0: sqrt(-0.0) is -0.0)

    @staticmethod
    def div(a: float, b: float) -> float:
        try:
            return a / b
        except ZeroDivisionError:
            if math.isnan(a) or a == 0:
                return math.nan
            return math.copysign(math.inf, a) * math.copysign(1.0, b)

    @staticmethod
    def where(condition: bool, a, b):
        return a if condition else b


class ZClip:
    """Adaptive gradient clipping by z-score of the total grad norm, a drop-in
    for ``zclip.ZClip`` (same arguments, defaults and results).

    ``step(model_or_parameters)`` after ``backward()`` and before the optimizer
    step clips the grads in place and returns the total norm before clipping
    as a 0-dim tensor on the grads' device (zclip returns a float; ``float()``
    of ours equals it within the rounding of the norm).  Nothing waits for the
    device.  ``mean``, ``var``, ``last_norm``, ``last_coef``, ``last_clipped``
    are device tensors; ``state_dict()``/``load_state_dict()`` resume exactly.
    ``process_group=``/DTensor grads: the norm is that of the whole, as in
    :func:`fastclip.clip_grad_norm_`, and every rank keeps the same statistics.
    Differences (README): the norm is fastclip's (fp16/bf16 grads summed in
    float32, where zclip computes it in the first grad's dtype).
    """

    def __init__(
        self,
        alpha=0.97,
        z_thresh=2.5,
        max_grad_norm=1.0,
        eps=1e-6,
        warmup_steps=25,
        mode="zscore",
        clip_option="adaptive_scaling",
        clip_factor=1.0,
        skip_update_on_spike=False,
        *,
        backend=None,
        process_group=None,
    ):
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.max_grad_norm = max_grad_norm
        self.eps = eps
        self.warmup_steps = warmup_steps
        self.mode = mode.lower()
        self.clip_factor = clip_factor
        self.skip_update_on_spike = skip_update_on_spike
        if self.mode == "zscore":  # zclip's checks and messages
            if clip_option not in ["mean", "adaptive_scaling"]:
                raise AssertionError("For zscore mode, clip_option must be either 'mean' or 'adaptive_scaling'.")
            self.clip_option = clip_option.lower()
        elif self.mode == "percentile":
            self.clip_option = None
        else:
            raise ValueError("mode must be either 'zscore' or 'percentile'.")
        self._check_z_thresh()
        self.backend = backend
        self.process_group = process_group
        self._steps = 0  # norms recorded in warm-up (counted on the host: no sync)
        self._record = None  # float64 [warm-up length]: the warm-up norms
        self._mean = self._var = None  # float64 0-dim, once initialized
        self.last_norm = self.last_coef = self.last_clipped = None

    def _check_z_thresh(self) -> None:
        # zclip divides by z_thresh at its first step above the mean (ZeroDivisionError
        # there); on the device that would be a silent inf, so it is refused up front:
        # when made, and at every step after warm-up (set later, or loaded from a state dict)
        if self.clip_option == "adaptive_scaling" and self.z_thresh == 0:
            raise ValueError("z_thresh must not be 0 with clip_option='adaptive_scaling' (it divides by z_thresh)")

    # ------------------------------------------------------------ zclip's attributes

    @property
    def initialized(self) -> bool:
        return self._mean is not None

    @property
    def mean(self):
        """The EMA of the norm (float64 0-dim tensor), None during warm-up."""
        return self._mean

    @property
    def var(self):
        """The EMA of the norm's variance (float64 0-dim tensor), None during warm-up."""
        return self._var

    @property
    def buffer(self) -> torch.Tensor:
        """The norms recorded so far in warm-up (float64 1-D tensor; empty after)."""
        if self._record is None or self.initialized:
            return torch.empty(0, dtype=F64)
        return self._record[: self._steps]

    # ------------------------------------------------------------ the step

    @no_grad
    @eager_under_compile  # state on the host: under torch.compile this runs eagerly
    def step(self, model_or_parameters) -> torch.Tensor:
        """Clip the grads in place; returns their total norm before clipping."""
        whole = WholeNorm(params_of(model_or_parameters), resolve_name(self.backend), self.process_group)
        if capturing(whole.device) and (not self.initialized or self._mean.device != whole.device):
            # A replay would run none of this Python: the warm-up's count and record, and the
            # move of loaded statistics to the device, would stay as they were at capture.
            raise RuntimeError(
                "ZClip.step: a warm-up step (the first warmup_steps) and the first step after "
                "load_state_dict keep their state on the host and cannot be captured in a CUDA graph; "
                "run them before capturing"
            )
        if not self.initialized:
            return self._warm_up(whole)
        self._check_z_thresh()  # (before anything is read or written)
        total = whole.norm()
        if self._mean.device != total.device:  # loaded elsewhere: follow the grads
            self._mean, self._var = self._mean.to(total.device), self._var.to(total.device)
        if total.device.type in HOST_DEVICE_TYPES:
            # The host is the device: reading a value waits for nothing, and a
            # dozen float operations cost less than the dozens of tensor ops
            # (the same float64 operations, so the same bits).
            ops, norm, mean, var = _FLOATS, whole.value(total).item(), self._mean.item(), self._var.item()
        else:
            ops, norm, mean, var = _TENSORS, whole.value(total), self._mean, self._var
        coef, clipped, mean, var = self._coefficient_and_ema(norm, mean, var, ops)
        if ops is _FLOATS:
            scale = coef != 1.0
            coef = torch.scalar_tensor(coef, dtype=F64, device=total.device)
            if scale:
                whole.scale(coef, like_a_float=True)
            self._mean.fill_(mean)
            self._var.fill_(var)
            clipped = torch.scalar_tensor(clipped, dtype=torch.bool, device=total.device)
        else:
            whole.scale(coef, like_a_float=True)  # zclip multiplies by a Python float
            self._mean.copy_(mean)  # in place: a captured CUDA graph keeps updating the same memory
            self._var.copy_(var)
        self.last_norm, self.last_coef, self.last_clipped = total, coef, clipped
        return total

    def _coefficient_and_ema(self, norm, mean, var, ops) -> tuple:
        """(coefficient, whether it clips, the next mean and variance) from the
        norm and the statistics: float64 tensors or Python floats, with `ops`
        their sqrt, division and where."""
        std = ops.sqrt(var)
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            spike = norm > threshold
        else:
            z = ops.div(norm - mean, std + self.eps)
            if self.clip_option == "adaptive_scaling":
                eta = ops.div(z, self.z_thresh)  # a larger outlier gets a lower threshold
                threshold = (mean + ops.div(self.z_thresh * std, eta)) * self.clip_factor
            else:
                threshold = mean
            spike = z > self.z_thresh
        x = ops.where(spike, threshold, norm)  # the limit, and what the EMA takes in
        limit = x
        if self.max_grad_norm is not None:  # Python's min(limit, max_grad_norm)
            limit = ops.where(limit > self.max_grad_norm, float(self.max_grad_norm), limit)
        clipped = norm > limit
        coef = ops.where(clipped, ops.div(limit, norm + 1e-6), 1.0)
        # zclip's _update_ema: the variance with the updated mean
        new_mean = self.alpha * mean + (1 - self.alpha) * x
        new_var = self.alpha * var + (1 - self.alpha) * ((x - new_mean) * (x - new_mean))
        if self.skip_update_on_spike:
            new_mean, new_var = ops.where(spike, mean, new_mean), ops.where(spike, var, new_var)
        return coef, clipped, new_mean, new_var

    def _warm_up(self, whole: WholeNorm) -> torch.Tensor:
        # zclip's len(buffer) >= warmup_steps, read at every step (and its TypeError for a
        # warmup_steps such as None, here before any write)
        done = self._steps + 1 >= self.warmup_steps
        max_norm = None if self.max_grad_norm is None else float(self.max_grad_norm)  # (as clip_grad_norm_ takes it)
        if max_norm is not None:
            total = whole.clip(max_norm)
        else:
            total = whole.norm()
        norm = whole.value(total)
        self._record = self._room_for(self._steps + 1, norm.device)
        self._record[self._steps] = norm
        self._steps += 1
        if done:
            self._initialize(self._record[: self._steps])
        ones = torch.ones_like(norm)
        if max_norm is None:
            coef = ones
        elif whole.coef is not None:  # process_group=: the coefficient every rank clipped with
            coef = whole.coef.to(F64)
        else:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).to(F64)
        self.last_norm, self.last_coef, self.last_clipped = total, coef, coef < 1.0
        return total

    def _room_for(self, needed: int, device) -> torch.Tensor:
        """The warm-up record on `device` with room for `needed` norms, the
        norms recorded so far kept (warmup_steps may change during warm-up,
        as zclip reads it at every step; an infinite one never ends it)."""
        record = self._record
        if record is not None and len(record) >= needed:
            return record.to(device)  # loaded elsewhere: follow the grads
        try:
            length = max(math.ceil(self.warmup_steps), needed)
        except (OverflowError, ValueError, TypeError):  # inf, NaN: grown as it fills
            length = needed
        grown = torch.zeros(min(length, 2 * needed + 64), dtype=F64, device=device)
        if record is not None and self._steps:
            grown[: self._steps] = record[: self._steps].to(device)
        return grown

    def _initialize(self, norms: torch.Tensor) -> None:
        """mean and var of the warm-up norms, summed left to right as Python's sum() does."""
        n = len(norms)
        total = norms[0].clone()
        for i in range(1, n):
            total = total + norms[i]
        mean = total / n
        squares = (norms - mean) * (norms - mean)
        total = squares[0].clone()
        for i in range(1, n):
            total = total + squares[i]
        self._mean, self._var = mean, total / n
        self._steps = 0

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The settings and the statistics (tensors as they are: torch.save keeps every bit)."""
        return {
            **{k: getattr(self, k) for k in _CONFIG},
            "steps": self._steps,
            "buffer": None if self._record is None else self._record.clone(),
            "mean": None if self._mean is None else self._mean.clone(),
            "var": None if self._var is None else self._var.clone(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue from a state_dict(): the next step gives the same bits as it
        would have without the interruption."""
        # read whole before anything changes: a bad state leaves the clipper as it was
        config = {k: state_dict[k] for k in _CONFIG}
        steps = int(state_dict["steps"])
        record, mean, var = (
            None if state_dict[k] is None else state_dict[k].detach().to(F64).clone() for k in ("buffer", "mean", "var")
        )
        for k, v in config.items():
            setattr(self, k, v)
        self._steps, self._record, self._mean, self._var = steps, record, mean, var
        if self._mean is not None:  # statistics follow the grads' device at the next step
            self._record = None

    def stats(self) -> dict:
        """The last step's total norm, coefficient (float64) and whether it clipped, as device tensors."""
        return {"norm": self.last_norm, "coef": self.last_coef, "clipped": self.last_clipped}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in _CONFIG)
        return f"fastclip.ZClip({settings})"
