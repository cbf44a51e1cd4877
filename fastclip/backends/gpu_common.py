"""Host-side pieces shared by the GPU backends (triton_backend.py, cuda_backend.py)."""

from __future__ import annotations

import math

import torch

from .._work import DTYPE_CODES, EXT_IMPORT_ERROR, GradList, _ext
from .base import FusedBackend

# Why a GPU backend is unavailable without fastclip._cpu: its gather builds the tensor table.
NO_TABLE_REASON = f"its tensor table needs the compiled extension fastclip._cpu ({EXT_IMPORT_ERROR})"


class GpuBackend(FusedBackend):
    """What the GPU backends share.  `available` is asked on every "auto"
    call: the answer is remembered per value of availability_mode() (the
    interpreter or emulator setting).  A subclass provides _norm (total norm
    and coefficient on the device, without touching the grads), _scale, and
    the number of partials its norm kernel writes."""

    _available_in = object()  # no answer yet
    _available = False

    def __init__(self):
        self._workspaces: dict = {}

    def availability_mode(self):
        raise NotImplementedError

    def norm(self, grads: GradList, kind: int) -> torch.Tensor:
        return self._norm(grads, kind, float("inf"))[0]

    def norm_wide(self, grads: GradList, kind: int) -> torch.Tensor:
        self._norm(grads, kind, float("inf"))
        return self._workspace(grads.device).results[1].clone()  # the workspace is reused by the next call

    def clip_details(self, grads: GradList, kind: int, max_norm: float) -> tuple[float, float]:
        self._norm(grads, kind, max_norm)
        results = self._workspace(grads.device).results.tolist()
        coef_total = results[1] if grads.result_dtype == torch.float64 else _ext.round_to_dtype(results[1], 0)
        return coef_total, results[0]

    @property
    def available(self) -> bool:
        mode = self.availability_mode()
        if self._available_in != mode:
            self._available = self.status()["available"]
            self._available_in = mode
        return self._available

    def scale(self, grads: GradList, coef: torch.Tensor) -> bool:
        if not kernel_can_take(grads, coef):
            return False
        self._scale(grads, coef)
        return True

    @staticmethod
    def _scale_around(grads: GradList, coef: torch.Tensor, overlap: bool, launch) -> None:
        """grads *= coef, `launch()` running the scale kernel over the dense
        grads and torch ops scaling the views.  Duplicated or overlapping grads
        are scaled once per appearance, like torch: one tensor at a time, so
        no two blocks race."""
        if overlap:
            for t in grads.tensors:
                torch_scale(t, coef)
        else:
            launch()
            for i in grads.strided_indices():
                torch_scale(grads.tensors[i], coef)
        grads.mark_modified()

    @staticmethod
    def _clamp_around(grads: GradList, clip_value: float, launch) -> None:
        """clip_grad_value_: `launch()` runs the clamp kernel over the dense
        grads, torch ops clamp the views; a NaN clip_value is torch's."""
        if clamp_to_nan(grads, clip_value):
            return
        launch()
        for i in grads.strided_indices():
            grads.tensors[i].clamp_min_(-clip_value).clamp_max_(clip_value)
        grads.mark_modified()

    def _norm(self, grads: GradList, kind: int, max_norm: float):
        raise NotImplementedError

    def _scale(self, grads: GradList, coef: torch.Tensor) -> None:
        raise NotImplementedError

    def _workspace_partials(self, device: torch.device) -> int:
        raise NotImplementedError

    def _workspace(self, device: torch.device, stream: int | None = None) -> Workspace:
        """Per device and stream (default: the current one): concurrent calls
        on other streams get their own."""
        key = (device, current_stream(device) if stream is None else stream)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._workspaces[key] = Workspace(self._workspace_partials(device), device)
        return ws


def current_stream(device: torch.device) -> int:
    """The current CUDA stream's handle on `device` (0 for CPU tensors: interpreter, emulator)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class Workspace:
    """Device memory a backend's kernels reuse on every call, one per device
    and stream (calls on other streams get their own): never allocated per
    call, so a call can be captured in a CUDA graph and replayed."""

    def __init__(self, partials: int, device: torch.device):
        self.partials = torch.zeros(partials, dtype=torch.float64, device=device)  # one per program / block
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)  # reset by the last program
        self.results = torch.ones(2, dtype=torch.float64, device=device)  # [clip coefficient, float64 total]
        self.coef = self.results[0]
        self.retired: list = []  # outgrown buffers: a captured CUDA graph may still write them

    def ensure_partials(self, n: int) -> None:
        if self.partials.numel() < n:
            self.retired.append(self.partials)
            self.partials = torch.zeros(n, dtype=torch.float64, device=self.partials.device)


def torch_scale(t: torch.Tensor, coef: torch.Tensor) -> None:
    """t *= coef exactly as the scale kernels do: in float32 for fp32/fp16/bf16
    (the coefficient rounded to float32), in float64 for fp64."""
    opmath = torch.float64 if t.dtype == torch.float64 else torch.float32
    c = coef.to(opmath)
    if t.dtype == opmath:
        t.mul_(c)
    else:
        t.copy_(t.to(opmath) * c)


def kernel_can_take(grads: GradList, coef) -> bool:
    """Can the scale kernels read `coef` (clip_grads_with_norm_'s coefficient)
    from device memory: a plain 0-dim tensor of a kernel dtype on the grads' device?"""
    return (
        type(coef) is torch.Tensor and coef.dim() == 0 and coef.dtype in DTYPE_CODES and coef.device == grads.device
    )


def clamp_to_nan(grads: GradList, clip_value: float) -> bool:
    """A NaN clip_value makes every element NaN: torch's own ops do it,
    exactly.  True if it was NaN (and the call is done)."""
    if not math.isnan(clip_value):
        return False
    torch._foreach_clamp_min_(grads.tensors, clip_value)
    torch._foreach_clamp_max_(grads.tensors, clip_value)
    return True


def clamp_bounds(clip_value: float) -> dict:
    """(-clip_value, clip_value) as torch converts them to each 16/32-bit
    grad dtype (as the CPU kernels do): lo32, hi32, lo16, hi16, lo_bf16, hi_bf16."""
    bounds = {}
    for dtype, name in ((torch.float32, "32"), (torch.float16, "16"), (torch.bfloat16, "_bf16")):
        bounds["lo" + name] = _ext.round_to_dtype(-clip_value, DTYPE_CODES[dtype])  # exact in float32
        bounds["hi" + name] = _ext.round_to_dtype(clip_value, DTYPE_CODES[dtype])
    return bounds
