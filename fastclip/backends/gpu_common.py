"""Host-side pieces shared by the GPU backends (triton_backend.py, cuda_backend.py)."""

from __future__ import annotations

import torch


class Workspace:
    """Device memory a backend's kernels reuse on every call, one per device
    and stream (calls on other streams get their own): never allocated per
    call, so a call can be captured in a CUDA graph and replayed."""

    def __init__(self, partials: int, device: torch.device):
        self.partials = torch.zeros(partials, dtype=torch.float64, device=device)  # one per program / block
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)  # reset by the last program
        self.results = torch.ones(2, dtype=torch.float64, device=device)  # [clip coefficient, float64 total]
        self.coef = self.results[0]

    def ensure_partials(self, n: int) -> None:
        if self.partials.numel() < n:
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
