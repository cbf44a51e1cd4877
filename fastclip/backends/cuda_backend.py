"""The CUDA C++ backend: host side (kernels: csrc/cuda/kernels.cu, module fastclip._cuda).

Per call: the grads' unit table is built in C++ (fastclip._cpu, O(n)) and
handed to fastclip._cuda, which passes it to the kernels by value as kernel
parameters (up to 1600 grads per launch), so nothing is copied to or cached
on the device, and a CUDA graph keeps the table in its launch parameters.

clip_grad_norm_ is one cooperative launch: norm, grid-wide barrier, the clip
coefficient, then the scale (skipped when the coefficient is exactly 1).
It falls back to a norm launch plus a scale launch (no host sync either way)
where a cooperative launch is not possible, or not allowed
(FASTCLIP_CUDA_COOPERATIVE=0, or the `cooperative` attribute), and to one
such pair per 1600 grads for longer lists.  clip_grad_value_ is one launch.
Nothing waits for the device unless error_if_nonfinite=True.

Grads that are views (not one dense block) and grads that overlap are handled
as in the Triton backend: norm from contiguous copies, writes through torch
ops that compute exactly what the kernels compute.

With FASTCLIP_CUDA_EMULATE=1 the same kernels and launchers, compiled for the
CPU against a CUDA emulation (fastclip._cuda_emu, csrc/cuda/emulation.h), run
on CPU tensors: that is how this backend is tested without a GPU.  "auto"
never picks it for CPU tensors.
"""

from __future__ import annotations

import collections
import os

import torch

from .._ext import CUDA_IMPORT_ERROR
from .._ext import cuda as _cuda
from .._ext import cuda_emu as _cuda_emu
from .._work import DTYPE_CODES, GradList, _ext
from .base import Coefficient, SegmentCall, SegmentOutputs, status_dict
from .gpu_common import NO_TABLE_REASON, DeviceTables, GpuBackend, clamp_bounds, current_stream, segment_plan

_OVERLAP_CACHE_SIZE = 16


def _cuda_version(v: int) -> str | None:
    return f"{v // 1000}.{v % 1000 // 10}" if v else None


def emulating() -> bool:
    return os.environ.get("FASTCLIP_CUDA_EMULATE", "0").lower() in ("1", "true", "on", "yes")


class CudaBackend(GpuBackend):
    name = "cuda"
    auto_device_types = ("cuda",)

    def __init__(self):
        super().__init__()
        # One launch for clip_grad_norm_ where the device allows (tests turn it off to check the fallback).
        self.cooperative = os.environ.get("FASTCLIP_CUDA_COOPERATIVE", "1") != "0"
        self.last_launches = 0  # kernel launches of the last operation (tests, benchmarks)
        self._setups: dict = {}  # (emulating, device index) -> (launch shape, or None and the reason)
        self._overlap: collections.OrderedDict = collections.OrderedDict()
        self._segment_tables = DeviceTables(_OVERLAP_CACHE_SIZE)  # the segmented kernels read theirs from memory

    # ------------------------------------------------------------ status

    @property
    def _m(self):
        """The module with the kernels: the CUDA build, or its CPU emulation."""
        return _cuda_emu if emulating() else _cuda

    def status(self) -> dict:
        if emulating():
            built = _cuda is not None
            if _cuda_emu is None or _ext is None:
                why = "fastclip._cuda_emu" if _cuda_emu is None else "fastclip._cpu"
                return status_dict(built, False, f"the extension {why} is not built")
            return status_dict(built, True, mode="emulator (FASTCLIP_CUDA_EMULATE=1): CPU tensors")
        if _cuda is None:
            why = CUDA_IMPORT_ERROR or "no nvcc at build time"
            return status_dict(False, False, f"the extension fastclip._cuda is not built ({why})")
        rt = _cuda.runtime_status()
        info = {
            "version": f"CUDA runtime {_cuda_version(rt['runtime_version'])} (static)",
            "driver": _cuda_version(rt["driver_version"]),
            "archs": _cuda.archs,
        }
        if _ext is None:
            return status_dict(True, False, NO_TABLE_REASON, **info)
        if rt["driver_version"] == 0:
            return status_dict(True, False, "no CUDA driver on this machine", **info)
        if rt["error"]:
            return status_dict(True, False, f"no usable CUDA device ({rt['error']})", **info)
        return status_dict(True, True, devices=rt["devices"], **info)

    def availability_mode(self):
        return emulating()

    def serves(self, grads: GradList) -> bool:
        if emulating():
            return grads.device.type == "cpu"
        return grads.device.type == "cuda" and self._setup(grads.device)[0] is not None

    def setup(self, device: torch.device) -> dict:
        """Launch shape on `device` (grid sizes from the kernels' occupancy, cooperative launch support)."""
        setup, reason = self._setup(device)
        if setup is None:
            raise RuntimeError(reason)
        return setup

    def _setup(self, device: torch.device) -> tuple:
        """(launch shape, "") or (None, why the kernels cannot run on `device`), found once."""
        key = (emulating(), device.index or 0)
        entry = self._setups.get(key)
        if entry is None:
            try:
                entry = (self._m.device_setup(device.index or 0), "")
            except RuntimeError as exc:  # e.g. no kernel image for this GPU's architecture
                entry = (None, str(exc))
            self._setups[key] = entry
        return entry

    # ------------------------------------------------------------ operations

    def clip_norm(self, grads: GradList, kind: int, max_norm: float, error_if_nonfinite: bool):
        # Norm and scale in the same launches, unless the norm must be checked
        # first, or some grads are views or overlap (scaled by torch ops below).
        total, coef, fused = self._norm(grads, kind, max_norm, scale=not error_if_nonfinite)
        if fused:
            grads.mark_modified()
            return total, False
        if error_if_nonfinite and not bool(torch.isfinite(total)):  # the one sync, as in torch
            return total, True
        launches = self.last_launches
        self._scale(grads, coef)
        self.last_launches += launches
        return total, False

    def _clamp(self, grads: GradList, lo: float, hi: float) -> None:
        self.last_launches = 0
        table, rows, units, _aligned, _mask = grads.table.unit_table(self._m.unit_elems)
        if units:
            self.last_launches = self._m.clamp(
                grads.device.index or 0, current_stream(grads.device), table, rows, units,
                **clamp_bounds(lo, hi), lo64=lo, hi64=hi,
            )  # fmt: skip

    # ------------------------------------------------------------ segmented primitives

    def segments(
        self, call: SegmentCall, kind: int, out: SegmentOutputs, coefficient: Coefficient, apply: bool
    ) -> None:
        self.last_launches = self._segment_step(call, "reduce", kind, out, coefficient)
        if apply:
            launches = self.last_launches
            self.segment_apply(call, out.coefs)
            self.last_launches += launches

    def segment_reduce(self, call: SegmentCall, kind: int, out: SegmentOutputs) -> None:
        self.last_launches = self._segment_step(call, "reduce", kind, out, None)

    def segment_finish(self, call: SegmentCall, kind: int, out: SegmentOutputs, coefficient: Coefficient) -> None:
        self.last_launches = self._segment_step(call, "finish", kind, out, coefficient)

    def segment_apply(self, call: SegmentCall, coefs: torch.Tensor) -> None:
        self.last_launches = self._segment_step(call, "apply", 2, SegmentOutputs(powers=None, coefs=coefs), None)
        call.grads.mark_modified()

    def _segment_step(self, call, step: str, kind: int, out: SegmentOutputs, coefficient) -> int:
        """One segmented launch (step: reduce, finish or apply); returns the launches."""
        device = call.grads.device
        plan = segment_plan(call, self._m.unit_elems)
        if plan["units"] == 0 and step != "finish":  # only empty grads: the outputs keep their initial values
            if out.total is not None and step == "reduce":
                out.total.zero_()
            return 0
        table = self._segment_tables.get(device, plan["bytes"], (emulating(), self._m.unit_elems))
        stream = current_stream(device)
        ws = self._workspace(device, stream)
        weights = out.weight_powers is not None
        ws.ensure_segments(plan["units"], plan["segments"], weights)
        c = coefficient or Coefficient("none")
        finishing = coefficient is not None
        return self._m.segments(
            device.index or 0, stream, step, table.data_ptr(), plan["rows"], plan["units"], plan["segments"],
            plan["filled"],
            unit_parts=ws.unit_parts.data_ptr(), unit_weight_parts=ws.unit_weight_parts.data_ptr() if weights else 0,
            segment_counter=ws.segment_counter.data_ptr(), done_counter=ws.counter.data_ptr(),
            powers=_address(out.powers), weight_powers=_address(out.weight_powers), counts=_address(out.counts),
            max_norms=_address(c.max_norms), max_norms_len=0 if c.max_norms is None else c.max_norms.numel(),
            clip_factor=c.clip_factor, eps=c.eps,
            norms=_address(out.norms) if finishing else 0,
            norms_code=0 if out.norms is None else DTYPE_CODES[out.norms.dtype],
            coefs=_address(out.coefs), total=_address(out.total) if finishing else 0,
            total_code=0 if out.total is None else DTYPE_CODES[out.total.dtype],
            mode=c.code, kind=kind, finish=finishing,
        )  # fmt: skip

    # ------------------------------------------------------------ internals

    def _norm(self, grads: GradList, kind: int, max_norm: float, scale: bool = False):
        """(total norm tensor, float64 coefficient tensor, scaled): both tensors
        on the device.  With scale=True the grads are clipped in the same
        launches, unless some are views or overlap (then scaled is False)."""
        dense = grads.with_dense_copies()  # views: norm of a contiguous copy
        table, rows, units, _aligned, _mask = dense.table.unit_table(self._m.unit_elems)
        scale = scale and dense is grads and not self._overlaps(grads, table)
        device = grads.device
        stream = current_stream(device)
        ws = self._workspace(device, stream)
        total = torch.empty((), dtype=grads.result_dtype, device=device)
        result_code = DTYPE_CODES[grads.result_dtype]
        if units == 0:  # only empty grads: nothing to scale
            total.zero_()
            ws.results[0] = _ext.clip_coefficient(0.0, result_code, max_norm)
            ws.results[1] = 0.0
            self.last_launches = 0
            return total, ws.coef, scale
        # one partial per block of every launch: at most a full grid per chunk of the table
        ws.ensure_partials(self.setup(device)["norm_grid"] * (rows // self._m.small_rows + 1))
        self.last_launches = self._m.clip_norm(
            device.index or 0, stream, table, rows, units, kind, max_norm, result_code,
            total.data_ptr(), ws.results.data_ptr(), ws.partials.data_ptr(), ws.partials.numel(),
            ws.counter.data_ptr(), scale, self.cooperative,
        )  # fmt: skip
        return total, ws.coef, scale

    def _scale(self, grads: GradList, coef: torch.Tensor) -> None:
        self.last_launches = 0
        table, rows, units, _aligned, _mask = grads.table.unit_table(self._m.unit_elems)

        def launch():
            if units:
                self.last_launches = self._m.scale(
                    grads.device.index or 0, current_stream(grads.device), table, rows, units,
                    coef.data_ptr(), DTYPE_CODES[coef.dtype],
                )  # fmt: skip

        self._scale_around(grads, coef, self._overlaps(grads, table), launch)

    def _overlaps(self, grads: GradList, table: bytes) -> bool:
        """Do some grads share memory?  Remembered per table of a list without
        views (the table then names every non-empty grad; training loops
        repeat theirs)."""
        if grads.strided_indices():
            return _ext.tensors_overlap(grads.table)
        hit = self._overlap.get(table)
        if hit is None:
            hit = self._overlap[table] = _ext.tensors_overlap(grads.table)
            if len(self._overlap) > _OVERLAP_CACHE_SIZE:
                self._overlap.popitem(last=False)
        return hit

    def _workspace_partials(self, device: torch.device) -> int:
        return self.setup(device)["norm_grid"]


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
