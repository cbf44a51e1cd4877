"""The Triton backend: host side (kernels in triton_kernels.py).

Per call: the grads' table (built in C++ from the gathered TensorTable, see
csrc/common/unit_table.h) is looked up in a small cache keyed by its bytes, so
a training loop whose grads keep their addresses copies nothing to the device
after the first step; a new table goes through pinned memory with a
non-blocking copy (no sync) and stays cached (gpu_common.DeviceTables: what
CUDA graph captures and other streams may reuse of it).
As with any CUDA graph, run a call before capturing: it compiles the
kernels and builds the table outside the capture.  Then one launch for the
norm (and coefficient), one for the scale, or one for the clamp.  Nothing
waits for the device unless error_if_nonfinite=True.

On the CPU, with TRITON_INTERPRET=1, the same kernels run through Triton's
interpreter on CPU tensors: that is how this backend is tested without a GPU.
"auto" never picks it for CPU tensors.

Grads that are views (not one dense block) are rare: their norm is taken
from contiguous copies in the same launch, and they are scaled or clamped
with torch ops that compute exactly what the kernels do.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import struct

import torch

from .._work import DTYPE_CODES, GradList, _ext
from .base import Coefficient, SegmentCall, SegmentOutputs, status_dict
from .gpu_common import (
    FLAG_DTYPES,
    NO_TABLE_REASON,
    DeviceTables,
    GpuBackend,
    clamp_bounds,
    segment_plan,
)


@dataclasses.dataclass
class TritonConfig:
    """Work split and launch shape.  A unit is block * iters elements."""

    block: int
    iters: int
    num_warps: int
    programs_per_sm: int  # persistent grid: programs_per_sm * SMs (the interpreter counts as one SM)

    @property
    def unit(self) -> int:
        return self.block * self.iters


# GPU: 4096-element blocks over 8 warps are 16 elements per thread per step
# (two 16-byte loads of bf16, four of fp32), 2 steps unrolled per unit (8192
# elements: 16 KB of bf16, 32 KB of fp32).  ptxas (sm_90) gives the norm
# kernel 102-128 registers and no spills, so 2 programs fit on an SM: 32-64 KB
# of loads in flight per SM.  (8 steps took 255 registers and spilled with
# all four dtypes.)  Not yet tuned on a GPU.  Under the interpreter, small
# units keep tests fast and put several units in small tensors.
GPU_CONFIG = TritonConfig(block=4096, iters=2, num_warps=8, programs_per_sm=2)
INTERPRETER_CONFIG = TritonConfig(block=256, iters=2, num_warps=1, programs_per_sm=4)

_PLAN_CACHE_SIZE = 16
_FINISH_BLOCK = 1024  # partials a segment's finisher folds per step


def _bits(x: float) -> int:
    """The float64 x as the int64 with its bits (kernels take doubles this way)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits32(x: float) -> int:
    """The float32 value x (exact in float32) as the int32 with its bits."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclasses.dataclass
class _Plan:
    """One table on the device, and what the launches need to know about it."""

    table: torch.Tensor | None  # int64, 4 columns of `rows` (None in the cache: each call's copy has it)
    rows: int
    units: int
    aligned: bool
    flags: dict  # HAS_F32 ... for the kernels
    search_steps: int
    overlap: bool  # some grads share memory: scale them one at a time


class TritonBackend(GpuBackend):
    name = "triton"
    auto_device_types = ("cuda",)

    def __init__(self):
        super().__init__()
        self._kernels = None
        self._plans: collections.OrderedDict = collections.OrderedDict()  # what launches need of a table
        self._unit_tables = DeviceTables(_PLAN_CACHE_SIZE)  # the tables themselves, on the device
        self._segment_tables = DeviceTables(_PLAN_CACHE_SIZE)
        self._max_programs: dict = {}

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        try:
            import triton
        except Exception as exc:  # noqa: BLE001 - absent or broken: report why
            return self._status(False, f"triton cannot be imported ({type(exc).__name__}: {exc})", None)
        version = triton.__version__
        if _ext is None:
            return self._status(False, NO_TABLE_REASON, version)
        if interpreting():
            return self._status(True, "", version, mode="interpreter (TRITON_INTERPRET=1): CPU tensors")
        if not torch.cuda.is_available():
            return self._status(
                False,
                "no CUDA device (TRITON_INTERPRET=1 runs its kernels on CPU tensors through Triton's interpreter)",
                version,
            )
        return self._status(True, "", version, mode="compiled: CUDA tensors")

    @staticmethod
    def _status(available: bool, reason: str, version, **extra) -> dict:
        return status_dict(version is not None, available, reason, version, **extra)  # built: triton imports

    def availability_mode(self):
        return interpreting()

    def serves(self, grads: GradList) -> bool:
        if interpreting():
            return grads.device.type == "cpu"
        return grads.device.type == "cuda"

    # ------------------------------------------------------------ operations

    def clip_norm(self, grads: GradList, kind: int, max_norm: float, error_if_nonfinite: bool):
        total, coef = self._norm(grads, kind, max_norm)
        if error_if_nonfinite and not bool(torch.isfinite(total)):  # the one sync, as in torch
            return total, True
        self._scale(grads, coef)
        return total, False

    def _clamp(self, grads: GradList, lo: float, hi: float) -> None:
        plan = self._plan(grads)
        if plan.units:
            self._launch(
                self._k().clamp_kernel, grads, plan,
                **{f"{k}_bits": _bits32(v) for k, v in clamp_bounds(lo, hi).items()},
                lo64_bits=_bits(lo), hi64_bits=_bits(hi),
            )  # fmt: skip

    # ------------------------------------------------------------ segmented primitives

    def segments(
        self, call: SegmentCall, kind: int, out: SegmentOutputs, coefficient: Coefficient, apply: bool
    ) -> None:
        self._segment_reduce(call, kind, out, coefficient)
        if apply:
            self.segment_apply(call, out.coefs)

    def segment_reduce(self, call: SegmentCall, kind: int, out: SegmentOutputs) -> None:
        self._segment_reduce(call, kind, out, None)

    def _segment_reduce(self, call, kind, out, coefficient) -> None:
        """The reduce launch; with a coefficient, each segment's finisher also computes it."""
        plan, table = self._segment_table(call)
        device = call.grads.device
        if plan["units"] == 0:  # only empty grads: the outputs keep their zeros (and coefficients of 1)
            if out.total is not None:
                out.total.zero_()
            return
        ws = self._workspace(device)
        weights = out.weight_powers is not None
        ws.ensure_segments(plan["units"], plan["segments"], weights)
        # the counters the last unit of each segment (and the last segment) finds itself
        # with start at 0: set on the stream, so that every CUDA graph sets them too
        ws.segment_counter[: plan["segments"]].zero_()
        ws.counter.zero_()
        c = coefficient or Coefficient("none")
        dummy = out.powers
        self._launch_on(
            self._k().segment_reduce_kernel, device, plan["units"],
            table=table, n_rows=plan["rows"], n_units=plan["units"], n_segments=plan["segments"],
            filled=plan["filled"], unit_parts=ws.unit_parts,
            unit_weight_parts=ws.unit_weight_parts if weights else ws.unit_parts,
            segment_counter=ws.segment_counter, done_counter=ws.counter,
            powers=out.powers, weight_powers=out.weight_powers if weights else dummy,
            counts=out.counts if out.counts is not None else ws.counter,
            max_norms=c.max_norms if c.max_norms is not None else dummy,
            max_norms_len=1 if c.max_norms is None else c.max_norms.numel(),
            clip_factor_bits=_bits(c.clip_factor), eps_bits=_bits(c.eps),
            norms=out.norms if out.norms is not None else dummy, coefs=out.coefs if out.coefs is not None else dummy,
            total=out.total if out.total is not None else dummy,
            MODE=c.code, KIND=kind, WEIGHTS=weights, COUNTS=out.counts is not None,
            FINISH=coefficient is not None, NORMS=coefficient is not None and out.norms is not None,
            TOTAL=coefficient is not None and out.total is not None,
            SEARCH_STEPS=plan["search_steps"], BLOCK=self._config().block, ITERS=self._config().iters,
            FINISH_BLOCK=_FINISH_BLOCK, ALIGNED=plan["aligned"], **plan["flags"], **plan["weight_flags"],
        )  # fmt: skip

    def segment_finish(self, call: SegmentCall, kind: int, out: SegmentOutputs, coefficient: Coefficient) -> None:
        plan, table = self._segment_table(call)
        device = call.grads.device
        if plan["segments"] == 0:
            return
        dummy = out.powers
        c = coefficient
        self._launch_on(
            self._k().segment_finish_kernel, device, plan["segments"],
            table=table, n_rows=plan["rows"], n_segments=plan["segments"], powers=out.powers,
            weight_powers=out.weight_powers if out.weight_powers is not None else dummy,
            max_norms=c.max_norms if c.max_norms is not None else dummy,
            max_norms_len=1 if c.max_norms is None else c.max_norms.numel(),
            clip_factor_bits=_bits(c.clip_factor), eps_bits=_bits(c.eps),
            norms=out.norms if out.norms is not None else dummy, coefs=out.coefs if out.coefs is not None else dummy,
            total=out.total if out.total is not None else dummy,
            MODE=c.code, KIND=kind, WEIGHTS=out.weight_powers is not None, NORMS=out.norms is not None,
            TOTAL=out.total is not None, FINISH_BLOCK=_FINISH_BLOCK,
        )  # fmt: skip

    def segment_apply(self, call: SegmentCall, coefs: torch.Tensor) -> None:
        plan, table = self._segment_table(call)
        if plan["units"]:
            self._launch_on(
                self._k().segment_apply_kernel, call.grads.device, plan["units"],
                table=table, n_rows=plan["rows"], n_units=plan["units"], coefs=coefs,
                SEARCH_STEPS=plan["search_steps"], BLOCK=self._config().block, ITERS=self._config().iters,
                ALIGNED=plan["aligned"], **plan["flags"],
            )  # fmt: skip
        call.grads.mark_modified()

    def _segment_table(self, call: SegmentCall):
        plan = segment_plan(call, self._config().unit)
        return plan, self._segment_tables.get(call.grads.device, plan["bytes"], (self._config().unit,))

    def _launch_on(self, kernel, device: torch.device, items: int, **args) -> None:
        """kernel on a persistent grid of at most `items` programs, on `device`."""
        grid = (max(1, min(items, self._grid_cap(device))),)
        if device.type != "cuda":
            kernel[grid](**args)
            return
        # No fused multiply-add: acc + x * x rounds twice, as in the interpreter
        # and the reference (triton's default changes between versions).
        options = {"num_warps": self._config().num_warps, "enable_fp_fusion": False}
        if device.index == torch.cuda.current_device():
            kernel[grid](**args, **options)
        else:
            with torch.cuda.device(device):  # triton launches on the current device
                kernel[grid](**args, **options)

    # ------------------------------------------------------------ internals

    def _norm(self, grads: GradList, kind: int, max_norm: float):
        """(total norm tensor, float64 coefficient tensor), both on the device."""
        dense = grads.with_dense_copies()  # views: norm of a contiguous copy
        plan = self._plan(dense)
        ws = self._workspace(grads.device)
        total = torch.empty((), dtype=grads.result_dtype, device=grads.device)
        if plan.units == 0:  # only empty grads
            total.zero_()
            ws.results[0] = _ext.clip_coefficient(0.0, DTYPE_CODES[grads.result_dtype], max_norm)
            ws.results[1] = 0.0
            return total, ws.coef
        ws.counter.zero_()  # (as the segment launch: every graph sets it)
        self._launch(
            self._k().norm_kernel, dense, plan,
            partials=ws.partials, counter=ws.counter, total_out=total, results=ws.results,
            max_norm_bits=_bits(max_norm),
            KIND=kind, RESULT_F64=grads.result_dtype == torch.float64,
            FINISH_BLOCK=ws.partials.numel(),
        )  # fmt: skip
        return total, ws.coef

    def _scale(self, grads: GradList, coef: torch.Tensor) -> None:
        plan = self._plan(grads)

        def launch():
            if plan.units:
                self._launch(self._k().scale_kernel, grads, plan, coef_ptr=coef)

        self._scale_around(grads, coef, plan.overlap, launch)

    def _k(self):
        if self._kernels is None:
            # Imported on first use: triton decides then whether to interpret.
            self._kernels = importlib.import_module(".triton_kernels", __package__)
        return self._kernels

    def _config(self) -> TritonConfig:
        return INTERPRETER_CONFIG if interpreting() else GPU_CONFIG

    def _plan(self, grads: GradList) -> _Plan:
        config = self._config()
        table_bytes, rows, units, aligned, dtype_mask = grads.table.unit_table(config.unit)
        key = (grads.device, config.unit, table_bytes)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        else:
            plan = self._plans[key] = _Plan(
                table=None,
                rows=rows,
                units=units,
                aligned=bool(aligned),
                flags={f"HAS_{n}": bool(dtype_mask >> DTYPE_CODES[d] & 1) for n, d in FLAG_DTYPES},
                search_steps=max(rows - 1, 0).bit_length(),
                overlap=_ext.tensors_overlap(grads.table),
            )
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)  # the least recently used
        # the table on the device, for this call's stream or CUDA graph capture (DeviceTables):
        # this call's own copy of the plan (the cached one is shared)
        return dataclasses.replace(plan, table=self._unit_tables.get(grads.device, table_bytes, (config.unit,)))

    def _workspace_partials(self, device: torch.device) -> int:
        return self._grid_cap(device)

    def _grid_cap(self, device: torch.device) -> int:
        cap = self._max_programs.get(device)
        if cap is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
            cap = sms * self._config().programs_per_sm
            cap = self._max_programs[device] = 1 << (cap - 1).bit_length()  # a power of two for the finish
        return cap

    def _launch(self, kernel, grads: GradList, plan: _Plan, **args) -> None:
        config = self._config()
        self._launch_on(
            kernel, grads.device, plan.units,
            table=plan.table, n_rows=plan.rows, n_units=plan.units,
            SEARCH_STEPS=plan.search_steps, BLOCK=config.block, ITERS=config.iters, ALIGNED=plan.aligned,
            **plan.flags, **args,
        )  # fmt: skip

