"""The fused C++ CPU backend (extension module fastclip._cpu).

One threaded pass computes the norm over every grad of every dtype; a second
pass scales, only if the coefficient is not exactly 1.  Threads follow
torch.get_num_threads().  For tests and comparisons, FASTCLIP_CPU_ISA=
baseline|avx2 forces an instruction set and FASTCLIP_CPU_THREADING=
openmp|pool the threads (torch's OpenMP threads, or fastclip's own pool).
"""

from __future__ import annotations

import os

import torch

from .._work import DTYPE_CODES, EXT_IMPORT_ERROR, GradList, _ext
from .base import Coefficient, FusedBackend, SegmentCall, SegmentOutputs, status_dict

if _ext is not None and os.environ.get("FASTCLIP_CPU_ISA"):
    if not _ext.select_isa(os.environ["FASTCLIP_CPU_ISA"]):
        raise ImportError(
            f"FASTCLIP_CPU_ISA={os.environ['FASTCLIP_CPU_ISA']!r} is not available here; "
            f"choose one of {_ext.available_isas()}"
        )
if _ext is not None and os.environ.get("FASTCLIP_CPU_THREADING"):
    if not _ext.set_threading(os.environ["FASTCLIP_CPU_THREADING"]):
        raise ImportError(f"FASTCLIP_CPU_THREADING={os.environ['FASTCLIP_CPU_THREADING']!r}: choose openmp or pool")


class CpuBackend(FusedBackend):
    name = "cpu"
    auto_device_types = ("cpu",)

    def status(self) -> dict:
        if _ext is None:
            why = f"the compiled extension fastclip._cpu could not be loaded ({EXT_IMPORT_ERROR})"
            return status_dict(False, False, why)
        return status_dict(  # no version: part of fastclip itself
            True,
            True,
            compiler=_ext.compiler,
            isa=_ext.isa(),
            isas=_ext.available_isas(),
            threads=torch.get_num_threads(),
            threading=_ext.threading(),
            gather="dlpack-exchange-api" if _ext.using_dlpack_exchange_api() else "attributes",
        )

    @property
    def available(self) -> bool:
        return _ext is not None

    def serves(self, grads: GradList) -> bool:
        return grads.device.type == "cpu"

    def norm(self, grads: GradList, kind: int) -> torch.Tensor:
        dtype = grads.result_dtype
        total = _ext.norm(grads.table, kind, torch.get_num_threads())
        return torch.scalar_tensor(_ext.round_to_dtype(total, DTYPE_CODES[dtype]), dtype=dtype)

    def norm_wide(self, grads: GradList, kind: int) -> torch.Tensor:
        return torch.scalar_tensor(_ext.norm(grads.table, kind, torch.get_num_threads()), dtype=torch.float64)

    def clip_norm(self, grads: GradList, kind: int, max_norm: float, error_if_nonfinite: bool):
        dtype = grads.result_dtype
        total, _coef, aborted, scaled = _ext.clip_norm(
            grads.table, kind, max_norm, DTYPE_CODES[dtype], error_if_nonfinite, torch.get_num_threads()
        )
        if scaled:
            grads.mark_modified()
        return torch.scalar_tensor(total, dtype=dtype), aborted

    def scale(self, grads: GradList, coef: torch.Tensor) -> bool:
        if type(coef) is not torch.Tensor or coef.dim() != 0 or not coef.is_floating_point() or not coef.is_cpu:
            return False
        value = coef.item()
        if value != 1.0:  # multiplying by exactly 1 changes no bit
            _ext.scale(grads.table, value, torch.get_num_threads())
            grads.mark_modified()
        return True

    def clamp(self, grads: GradList, clip_value: float) -> None:
        _ext.clamp(grads.table, clip_value, torch.get_num_threads())
        grads.mark_modified()

    # ------------------------------------------------------------ segmented primitives

    def segments(
        self, call: SegmentCall, kind: int, out: SegmentOutputs, coefficient: Coefficient, apply: bool
    ) -> None:
        self._run(call, kind, 1 | 2 | (4 if apply else 0), out, coefficient)

    def segment_reduce(self, call: SegmentCall, kind: int, out: SegmentOutputs) -> None:
        self._run(call, kind, 1, out, None)

    def segment_finish(self, call: SegmentCall, kind: int, out: SegmentOutputs, coefficient: Coefficient) -> None:
        self._run(call, kind, 2, out, coefficient)

    def segment_apply(self, call: SegmentCall, coefs: torch.Tensor) -> None:
        self._run(call, 2, 4, SegmentOutputs(powers=None, coefs=coefs), None)

    def _run(self, call, kind, steps, out, coefficient) -> None:
        c = coefficient or Coefficient("none")
        scaled = _ext.segments(
            call.table, kind, steps, torch.get_num_threads(),
            powers=_address(out.powers), weight_powers=_address(out.weight_powers), counts=_address(out.counts),
            mode=c.code, max_norms=_address(c.max_norms), max_norms_len=0 if c.max_norms is None else c.max_norms.numel(),
            clip_factor=c.clip_factor, eps=c.eps,
            norms=_address(out.norms), norms_code=0 if out.norms is None else DTYPE_CODES[out.norms.dtype],
            coefs=_address(out.coefs),
            total=_address(out.total), total_code=0 if out.total is None else DTYPE_CODES[out.total.dtype],
        )  # fmt: skip
        if scaled:
            call.grads.mark_modified()

    def clamp_range(self, grads: GradList, lo: float, hi: float) -> None:
        _ext.clamp_range(grads.table, lo, hi, torch.get_num_threads())
        grads.mark_modified()

    def clip_details(self, grads: GradList, kind: int, max_norm: float) -> tuple[float, float]:
        total = _ext.norm(grads.table, kind, torch.get_num_threads())
        code = DTYPE_CODES[grads.result_dtype]
        coef_total = total if code == DTYPE_CODES[torch.float64] else _ext.round_to_dtype(total, 0)
        return coef_total, _ext.clip_coefficient(total, code, max_norm)


def _address(t: torch.Tensor | None) -> int:
    """A contiguous CPU tensor's address for the kernels (0: none)."""
    return 0 if t is None else t.data_ptr()
