"""Host-side pieces shared by the GPU backends (triton_backend.py, cuda_backend.py)."""

from __future__ import annotations

import collections
import dataclasses
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
    and coefficient on the device, without touching the grads), _scale,
    _clamp, and the number of partials its norm kernel writes."""

    _available_in = object()  # no answer yet
    _available = False
    needs_dense = True

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

    def clamp(self, grads: GradList, clip_value: float) -> None:
        """clip_grad_value_: clamp_range(-clip_value, clip_value); a NaN clip_value is torch's."""
        if not clamp_to_nan(grads, clip_value):
            self.clamp_range(grads, -clip_value, clip_value)

    def clamp_range(self, grads: GradList, lo: float, hi: float) -> None:
        """The clamp kernel over the dense grads; torch ops clamp the views alike."""
        self._clamp(grads, lo, hi)
        for i in grads.strided_indices():
            grads.tensors[i].clamp_(lo, hi)
        grads.mark_modified()

    def _clamp(self, grads: GradList, lo: float, hi: float) -> None:
        raise NotImplementedError

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
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)  # zeroed before each launch that counts
        self.results = torch.ones(2, dtype=torch.float64, device=device)  # [clip coefficient, float64 total]
        self.coef = self.results[0]
        # The segmented kernels': a partial per unit (grads, weights), a counter per segment
        # and one for the segments done (`counter`), zeroed on the stream before each reduce.
        self.unit_parts = torch.zeros(0, dtype=torch.float64, device=device)
        self.unit_weight_parts = torch.zeros(0, dtype=torch.float64, device=device)
        self.segment_counter = torch.zeros(0, dtype=torch.int32, device=device)
        self.retired: list = []  # outgrown buffers: a captured CUDA graph may still write them

    def ensure_partials(self, n: int) -> None:
        if self.partials.numel() < n:
            self.retired.append(self.partials)
            self.partials = torch.zeros(n, dtype=torch.float64, device=self.partials.device)

    def ensure_segments(self, units: int, segments: int, weights: bool) -> None:
        """Room for `units` unit partials (and weight partials) and `segments` counters."""
        for name, n, dtype in (
            ("unit_parts", units, torch.float64),
            ("unit_weight_parts", units if weights else 0, torch.float64),
            ("segment_counter", segments, torch.int32),
        ):
            buf = getattr(self, name)
            if buf.numel() < n:
                self.retired.append(buf)
                setattr(self, name, torch.zeros(max(n, 2 * buf.numel()), dtype=dtype, device=buf.device))


class DeviceTables:
    """Tables (int64 bytes built in C++) on the device, cached by their bytes:
    a training loop whose grads keep their addresses copies nothing after the
    first step.  A new table goes through pinned memory with a non-blocking
    copy (no sync), ordered on the current stream; a call on another stream
    that takes it waits for that copy (an event, not the host).  CUDA graphs:
    a capture takes a table made before it (by the warm-up call a capture
    needs anyway), which is then never evicted, since the graph reads it at
    every replay; a table made during a capture is copied only when that
    graph replays, so it is that graph's alone (never handed to any other
    caller) and is kept, with its pinned source, as long as the backend."""

    def __init__(self, size: int = 16):
        self.size = size
        self._tables: collections.OrderedDict = collections.OrderedDict()  # key -> _TableEntry
        self._captured: list = []  # (table, pinned source) made during captures

    def get(self, device: torch.device, table_bytes: bytes, extra=()) -> torch.Tensor:
        """The table as an int64 tensor on `device` (`extra`: more of the cache key)."""
        key = (device, extra, table_bytes)
        entry = self._tables.get(key)
        if capturing(device):
            if entry is not None:
                entry.kept = True
                return entry.table
            table, host = to_device(table_bytes, device)
            self._captured.append((table, host))
            return table
        if entry is not None:
            self._tables.move_to_end(key)
            if entry.event is not None:
                stream = torch.cuda.current_stream(device)
                if stream.cuda_stream != entry.stream:  # copied on another stream: wait for it there
                    stream.wait_event(entry.event)
                    entry.table.record_stream(stream)
            return entry.table
        table, host = to_device(table_bytes, device)
        entry = self._tables[key] = _TableEntry(table, host)
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            entry.stream, entry.event = stream.cuda_stream, torch.cuda.Event()
            entry.event.record(stream)
        evictable = [k for k, e in self._tables.items() if not e.kept]
        if len(evictable) > self.size:
            del self._tables[evictable[0]]  # the least recently used
        return table

    def __len__(self) -> int:
        return len(self._tables) + len(self._captured)


@dataclasses.dataclass
class _TableEntry:
    table: torch.Tensor
    host: torch.Tensor | None  # the pinned source of the copy
    stream: int = 0  # the stream the copy was made on
    event: object = None  # recorded after the copy on that stream (CUDA)
    kept: bool = False  # a captured graph reads it: never evicted


def to_device(table_bytes: bytes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(int64 table on `device`, its pinned host source to keep alive, or None):
    a non-blocking copy through pinned memory, ordered on the current stream."""
    host = torch.frombuffer(bytearray(table_bytes), dtype=torch.int64) if table_bytes else torch.zeros(8, dtype=torch.int64)
    if device.type != "cuda":
        return host, None
    host = host.pin_memory()
    return host.to(device, non_blocking=True), host


def capturing(device: torch.device) -> bool:
    """Is a CUDA graph being captured on the current stream (of a CUDA device)?"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def segment_plan(call, unit: int) -> dict:
    """The segment table of a SegmentCall (csrc/common/segment_table.h) and
    what launches need to know of it."""
    table_bytes, rows, units, segments, filled, aligned, mask, weight_mask = call.table.segment_table(unit)
    return dict(
        bytes=table_bytes, rows=rows, units=units, segments=segments, filled=filled, aligned=bool(aligned),
        flags={f"HAS_{n}": bool(mask >> DTYPE_CODES[d] & 1) for n, d in FLAG_DTYPES},
        weight_flags={f"W_{n}": bool(weight_mask >> DTYPE_CODES[d] & 1) for n, d in FLAG_DTYPES},
        search_steps=max(rows - 1, 0).bit_length(),
    )  # fmt: skip


FLAG_DTYPES = (("F32", torch.float32), ("F64", torch.float64), ("F16", torch.float16), ("BF16", torch.bfloat16))


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


def clamp_bounds(lo: float, hi: float) -> dict:
    """The bounds (lo, hi) as torch converts them to each 16/32-bit grad
    dtype (as the CPU kernels do): lo32, hi32, lo16, hi16, lo_bf16, hi_bf16."""
    bounds = {}
    for dtype, name in ((torch.float32, "32"), (torch.float16, "16"), (torch.bfloat16, "_bf16")):
        bounds["lo" + name] = _ext.round_to_dtype(lo, DTYPE_CODES[dtype])  # exact in float32
        bounds["hi" + name] = _ext.round_to_dtype(hi, DTYPE_CODES[dtype])
    return bounds
