"""QuantileClip (AutoClip, Seetharaman et al. 2020; package `autoclip` 0.2.1)
with its histories on the device and all parameters clipped in one pass.

autoclip loops over the parameters in Python: for each, torch.quantile of
its history of norms, then torch.nn.utils.clip_grad_norm_(param, threshold),
then the norm appended to the history (the last `history_length` kept).  An
empty history gives threshold inf, which clips nothing.  Here:
  - every history is a row of a ring buffer on the device (one buffer per
    parameter group and history dtype: float32, float64 for float64 grads);
  - the quantiles of all rows are computed together (one partial sort per
    buffer; torch.quantile's linear interpolation, op for op: the same bits);
  - clip_grad_norm_per_tensor_ with those thresholds: one fused read gives
    every norm, the coefficients are torch's clamp(max_norm / (norm + 1e-6),
    max=1) (torch takes float(max_norm), a host sync autoclip pays per
    parameter), one fused pass scales the parameters that clip;
  - the norms are written into the rings.
No step waits for the device.  With global_threshold=True, one history of
the total norm and one threshold for all parameters (autoclip's global mode).

The state dict has autoclip's layout (`state`: per parameter id a
chronological `history`, or `global_history`; `param_groups`), so either
package can load the other's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from typing import NamedTuple

import torch

from .._dispatch import resolve_name
from .._no_grad import no_grad
from ..backends.gpu_common import capturing
from . import _segmented as seg
from ._whole import WholeNorm, eager_under_compile
from .per_tensor import clip_gathered, clip_grad_norm_per_tensor_

F32, F64 = torch.float32, torch.float64


def _history_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """autoclip's history starts float32 and hstack promotes: float64 only for float64 norms."""
    return F64 if grad_dtype == F64 else F32


def quantiles(rows: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(row, q) of every row of `rows` [R, n] (n >= 1), the same
    bits: the rank q*(n-1) rounded as torch rounds it, torch.lerp between the
    two neighbouring order statistics; a row holding a NaN gives NaN.  The
    order statistics come from a partial sort (topk from the nearer end)."""
    n = rows.shape[1]
    rank = torch.tensor(q, dtype=rows.dtype) * (n - 1)  # on the host, in the rows' dtype
    below, above = int(torch.floor(rank)), int(torch.ceil(rank))
    if n - below <= above + 1:  # the largest n - below, descending: below is the last
        top = torch.topk(rows, n - below, dim=1, largest=True, sorted=True).values
        low, high = top[:, n - below - 1], top[:, n - above - 1]
    else:  # the smallest above + 1, ascending
        bottom = torch.topk(rows, above + 1, dim=1, largest=False, sorted=True).values
        low, high = bottom[:, below], bottom[:, above]
    weight = torch.full((rows.shape[0],), float(rank - below), dtype=rows.dtype, device=rows.device)
    value = torch.lerp(low, high, weight)
    # amax propagates NaN: one cheap reduction finds the rows holding one
    return torch.where(torch.isnan(rows.amax(dim=1)), torch.full_like(value, math.nan), value)


_FIRST_COLUMNS = 64  # a history's room at first: it doubles as norms come, up to history_length


class _Rings:
    """The histories of some parameters: row r of a [rows, length] ring buffer
    on the device, with the counts of recorded norms in a host int64 tensor
    (a step is a few tensor ops however many rows there are).  `rows`
    arguments: a host long tensor of row indices, or None for all rows in order.
    The buffer's columns grow as norms are recorded (a history_length of
    2**40, autoclip's way of keeping everything, costs what is recorded)."""

    def __init__(self, length: int, dtype: torch.dtype, device: torch.device, group: int = 0):
        self.length, self.dtype, self.group = length, dtype, group
        self.buffer = torch.zeros(0, min(length, _FIRST_COLUMNS), dtype=dtype, device=device)
        self.counts = torch.zeros(0, dtype=torch.long)

    def add_row(self) -> int:
        self.buffer = torch.cat([self.buffer, self.buffer.new_zeros(1, self.buffer.shape[1])])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(1)])
        return len(self.counts) - 1

    def _room(self, needed: int) -> None:
        """At least min(needed, length) columns.  No row has wrapped while the
        buffer is narrower than `length`, so the new columns go at the end."""
        have = self.buffer.shape[1]
        want = min(needed, self.length)
        if want > have:
            grown = min(self.length, max(want, 2 * have))
            self.buffer = torch.cat([self.buffer, self.buffer.new_zeros(len(self.counts), grown - have)], dim=1)

    def thresholds(self, rows: torch.Tensor | None, q: float) -> torch.Tensor:
        """Per row in `rows`, the quantile of its history (inf if empty)."""
        filled = torch.clamp(self.counts if rows is None else self.counts[rows], max=self.length)
        lengths = torch.unique(filled).tolist()  # host values: no device sync
        device = self.buffer.device
        if rows is None and len(lengths) == 1 and lengths[0]:  # the usual case: every row, the same count
            return quantiles(self.buffer[:, : lengths[0]], q)
        out = torch.full((len(filled),), math.inf, dtype=self.dtype, device=device)
        for n in lengths:
            if not n:
                continue
            positions = (filled == n).nonzero().reshape(-1)
            picked = positions if rows is None else rows[positions]
            out[seg.to_device(positions, device)] = quantiles(self.buffer[seg.to_device(picked, device), :n], q)
        return out

    def record(self, rows: torch.Tensor | None, values: torch.Tensor) -> None:
        """Append values[i] to row rows[i]'s history (the oldest is overwritten when full)."""
        device = self.buffer.device
        counts = self.counts if rows is None else self.counts[rows]
        if len(counts):
            self._room(int(counts.max()) + 1)
        columns = counts % self.length
        if rows is None and len(columns) and bool((columns == columns[0]).all()):
            self.buffer[:, int(columns[0])] = values
        else:
            every = torch.arange(len(self.counts)) if rows is None else rows
            self.buffer[seg.to_device(every, device), seg.to_device(columns, device)] = values
        if rows is None:
            self.counts += 1
        else:
            self.counts[rows] += 1

    def history(self, row: int) -> torch.Tensor:
        """Row `row`'s norms, oldest first (what autoclip's history holds)."""
        n = int(self.counts[row])
        if n <= self.length:
            return self.buffer[row, :n].clone()
        start = n % self.length
        return torch.cat([self.buffer[row, start:], self.buffer[row, :start]])

    def load(self, row: int, history: torch.Tensor) -> None:
        """Row `row`'s history, as autoclip holds it.  A history longer than the
        rings (loaded from a run with a longer history_length) is kept whole,
        as autoclip keeps it until its next step's cut: the rings grow to it,
        and record_keeping cuts them back after that step's norm."""
        history = history.detach().reshape(-1)
        if len(history) > self.length:
            self._resize(len(history))
        self._room(len(history))
        history = history.to(device=self.buffer.device, dtype=self.dtype)
        self.buffer[row, : len(history)] = history
        self.counts[row] = len(history)

    def promote(self, dtype: torch.dtype) -> None:
        """Hold float64 from now on (autoclip's hstack promotes a float32 history
        once a float64 norm joins it; the float32 values convert exactly)."""
        self.dtype = dtype
        self.buffer = self.buffer.to(dtype)

    def to(self, device) -> None:
        self.buffer = self.buffer.to(device)

    def record_keeping(self, rows: torch.Tensor | None, values: torch.Tensor, length: int) -> None:
        """record(), keeping the last `length` norms of every row from now on
        (autoclip appends, then keeps the last history_length: a length changed
        during the run applies after this step's norm is appended)."""
        if length == self.length:
            self.record(rows, values)
            return
        self._resize(self.length + 1)  # room for this step's norm beside every norm kept so far
        self.record(rows, values)
        self._resize(length)

    def _resize(self, length: int) -> None:
        histories = [self.history(r) for r in range(len(self.counts))]
        self.length = length
        self.buffer = self.buffer.new_zeros(len(histories), min(length, _FIRST_COLUMNS))
        for r, h in enumerate(histories):
            self.load(r, h[-length:])  # the last `length` norms


def _quantile_key(q):
    """What a cached layout compares a group's quantile by: its value (a CPU
    tensor read each step, so an in-place change counts, as autoclip reads
    it each step), or for a tensor on another device the object itself
    (reading it would wait for that device)."""
    if isinstance(q, torch.Tensor) and q.device.type == "cpu" and q.numel() == 1:
        return float(q)
    return q


def _same_values(now: list, then: list) -> bool:
    """The same quantiles (device tensors: the same objects) as when the layout was made?"""
    return len(now) == len(then) and all(
        a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)
        for a, b in zip(now, then)
    )


class _Layout(NamedTuple):
    """Where each grad's history lives, kept while the same parameters have
    grads of the same kind: per rings, (rings, quantile, rows, positions)
    with rows a host long tensor or None (all, in order) and positions the
    grads' index (a slice or a device long tensor)."""

    history_dtype: torch.dtype
    device: torch.device
    parts: list
    quantiles: list  # the groups' quantiles it was made with


class QuantileClip:
    """AutoClip: clip each parameter's grad norm to a quantile of its own
    history of norms (``global_threshold=True``: the total norm to a quantile
    of its history).  A drop-in for ``autoclip.torch.QuantileClip``: same
    arguments, parameter groups, errors, state dict, and grads step by step
    (fp16/bf16 grads: their norms are float32 here, autoclip rounds them to
    the grads' dtype).  Everything stays on the device; ``last_norms``,
    ``last_thresholds``, ``last_coefs`` and ``last_clipped`` (and
    ``stats()``) hold the last step's values as device tensors.  A
    ``history_length`` changed during the run cuts every history at that
    step (autoclip cuts those of parameters without a grad at their next
    step); the ring position lives on the host, so a step is not
    CUDA-graph capturable.
    """

    def __init__(self, parameters, quantile=0.9, history_length=1000, global_threshold=False, *, backend=None):
        self.global_threshold = global_threshold
        self.global_quantile = quantile if global_threshold else None
        self.global_history_length = history_length if global_threshold else None
        self.backend = backend
        self.defaults = {"quantile": quantile, "history_length": history_length}
        self.verify_parameter_settings(self.defaults)
        self.parameter_groups: list[dict] = []
        self._rings: dict = {}  # (group index, history dtype) -> _Rings
        self._row: dict = {}  # parameter -> (rings key, row)
        self._global: _Rings | None = None
        self._pending: dict = {}  # parameter -> loaded history, for parameters not yet seen with a grad
        self._params: list = []  # every group's parameters, in order
        self._layout: _Layout | None = None  # the last step's, while it holds
        self.last_norms = self.last_thresholds = None
        if not isinstance(parameters, (Iterator, Iterable)):
            raise TypeError(
                "parameters argument given to the clipper should be an iterable of Tensors or dicts, but instead got "
                + torch.typename(parameters)
            )
        groups = list(parameters)
        if len(groups) == 0:
            raise ValueError(f"Clipper {type(self).__name__} got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # ------------------------------------------------------------ autoclip's checks

    def verify_parameter_settings(self, settings: dict) -> None:
        quantile, history_length = settings["quantile"], settings["history_length"]
        if not isinstance(quantile, (float, torch.Tensor)):
            raise TypeError("QuantileClip quantile value must be a float or a tensor.")
        if not isinstance(history_length, int):
            raise TypeError("QuantileClip history_length must be an int.")
        if quantile < 0.0 or quantile > 1.0:
            raise ValueError("QuantileClip quantile value must be between 0.0 and 1.0.")
        if history_length <= 0:
            raise ValueError("QuantileClip history length must be greater than zero.")

    def add_param_group(self, parameter_group, quantile=None, history_length=None) -> None:
        """A parameter group with its own quantile and history length (as in autoclip)."""
        if not isinstance(parameter_group, Mapping):
            parameter_group = {"params": parameter_group}
        params = parameter_group["params"]
        if isinstance(params, torch.Tensor):
            parameter_group["params"] = [params]
        elif isinstance(params, set):
            raise TypeError(
                "Clipping parameters must be ordered collections. The ordering of tensors in sets will change "
                "between runs.Please use a list instead."
            )
        else:
            parameter_group["params"] = list(params)
        for p in parameter_group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"Clipper {type(self).__name__} can only clip Tensors, but one of the params is {torch.typename(p)}"
                )
            if not p.is_leaf:
                raise ValueError(
                    "Gradients to clip will only accumulate on leaf Tensors. "
                    f"{type(self).__name__} recieved non-leaf Tensor."
                )
        for name, default in self.defaults.items():
            parameter_group.setdefault(name, default)
        if quantile is not None:
            parameter_group["quantile"] = quantile
        if history_length is not None:
            parameter_group["history_length"] = history_length
        self.verify_parameter_settings(parameter_group)
        params = parameter_group["params"]
        if len(params) != len(set(params)):
            raise ValueError("Clipper contains a parameter group with duplicate parameters.")
        seen = set(chain.from_iterable(g["params"] for g in self.parameter_groups))
        if not seen.isdisjoint(set(params)):
            raise ValueError("Some clipping parameters appear in more than one parameter group")
        self.parameter_groups.append(parameter_group)
        self._params += params
        self._layout = None

    # ------------------------------------------------------------ the step

    @no_grad
    @eager_under_compile  # state on the host: under torch.compile this runs eagerly
    def step(self) -> None:
        """Clip the grads in place (call after backward, before the optimizer step)."""
        device = next((p.grad.device for p in self._params if p.grad is not None), None)
        if device is not None and capturing(device):
            # the rings' counts and the column a step writes live on the host: a replay would
            # write the same column and take the quantiles of the histories of the capture
            raise RuntimeError(
                "QuantileClip.step cannot be captured in a CUDA graph: its histories' positions are kept "
                "on the host; call it outside the graph"
            )
        if self.global_threshold:
            self._clip_global()
        else:
            self._clip_local()

    def _entries(self) -> list:
        """(parameter, rings, row) for every parameter with a grad, in group order."""
        for group in self.parameter_groups:  # (before any rings are made for them)
            if any(p.grad is not None for p in group["params"]):
                _check_history_length(group["history_length"])
        entries = []
        for gi, group in enumerate(self.parameter_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                place = self._row.get(p)
                if place is None:
                    loaded = self._pending.get(p)
                    wide = p.grad.dtype == F64 or (isinstance(loaded, torch.Tensor) and loaded.dtype == F64)
                    key = (gi, F64 if wide else F32)  # (autoclip's hstack keeps a loaded float64 history float64)
                    rings = self._rings.get(key)
                    if rings is None:
                        rings = self._rings[key] = _Rings(int(group["history_length"]), key[1], p.grad.device, gi)
                    place = self._row[p] = (key, rings.add_row())
                    if p in self._pending:
                        rings.load(place[1], self._pending.pop(p))
                entries.append((p, self._rings[place[0]], place[1]))
        return entries

    def _layout_of(self, entries: list, device) -> list:
        """Per rings: (rings, quantile, rows, positions) for these entries."""
        per_rings: dict = {}  # id(rings) -> (rings, [positions], [rows])
        for i, (_p, rings, row) in enumerate(entries):
            item = per_rings.setdefault(id(rings), (rings, [], []))
            item[1].append(i)
            item[2].append(row)
        parts = []
        for rings, positions, rows in per_rings.values():
            every = rows == list(range(len(rings.counts)))
            rows = None if every else torch.tensor(rows, dtype=torch.long)
            if positions == list(range(positions[0], positions[0] + len(positions))):
                index = slice(positions[0], positions[0] + len(positions))
            else:
                index = seg.to_device(torch.tensor(positions, dtype=torch.long), device)
            parts.append((rings, float(self.parameter_groups[rings.group]["quantile"]), rows, index))
        return parts

    def _clip_local(self) -> None:
        gathered = seg.gather(self._params)
        if not gathered.grads:  # nothing clipped: no statistics of this step (not the last step's)
            self.last_norms = self.last_thresholds = None
            return
        # read every step, as autoclip does
        quantiles_now = [_quantile_key(group["quantile"]) for group in self.parameter_groups]
        if self._layout is not None and not _same_values(quantiles_now, self._layout.quantiles):
            self._layout = None
        layout = self._layout
        kind = _history_kind(gathered)
        if layout is None or gathered.positions is not None or kind is None or layout.history_dtype != kind:
            entries = self._entries()  # new parameters get their rows here
            device = entries[0][0].grad.device
            layout = _Layout(kind, device, self._layout_of(entries, device), quantiles_now)
            # kept for the next steps while every parameter has a grad of the same kind
            self._layout = layout if gathered.positions is None and kind is not None else None
        for rings, _q, rows, _index in layout.parts:  # what autoclip's step raises, before any grad is written
            group = self.parameter_groups[rings.group]
            _check_history_length(group["history_length"])
            if bool((rings.counts if rows is None else rings.counts[rows]).any()):  # (a quantile is taken)
                _check_quantile(group["quantile"], rings.dtype)
        thresholds = self._thresholds(layout, len(gathered.grads))
        # torch's clip_grad_norm_(p, max_norm=threshold) for every p at once: the
        # per-tensor method's coefficient is that one (float(max_norm), reciprocal, multiply)
        if gathered.positions is None:
            norms = clip_gathered(gathered, thresholds, backend=self.backend)
        else:
            params = [p for p in gathered.params if p.grad is not None]
            norms = clip_grad_norm_per_tensor_(params, thresholds, backend=self.backend)
        for rings, _q, rows, index in layout.parts:
            length = int(self.parameter_groups[rings.group]["history_length"])  # (a group's may change, as in autoclip)
            rings.record_keeping(rows, norms[index].to(rings.dtype), length)
        self.last_norms, self.last_thresholds = norms, thresholds

    def _thresholds(self, layout: _Layout, count: int) -> torch.Tensor:
        """Every grad's threshold (float64 [count], in the grads' order)."""
        if len(layout.parts) == 1:
            rings, q, rows, _index = layout.parts[0]
            return rings.thresholds(rows, q).to(F64)
        out = torch.empty(count, dtype=F64, device=layout.device)
        for rings, q, rows, index in layout.parts:
            out[index] = rings.thresholds(rows, q).to(F64)
        return out

    def _clip_global(self) -> None:
        params = list(chain.from_iterable(g["params"] for g in self.parameter_groups))
        whole = WholeNorm(params, resolve_name(self.backend))
        total = whole.norm()
        _check_history_length(self.global_history_length)
        wide = _history_dtype(total.dtype) == F64  # autoclip's hstack: float64 once a float64 norm (or history) joins
        if self._global is None:
            loaded = self._pending.pop("global_history", None)
            wide = wide or (loaded is not None and loaded.dtype == F64)
            self._global = _Rings(int(self.global_history_length), F64 if wide else F32, total.device)
            self._global.add_row()
            if loaded is not None:
                self._global.load(0, loaded)
        rings = self._global
        if wide and rings.dtype != F64:
            rings.promote(F64)
        if rings.buffer.device != total.device:
            rings.to(total.device)
        if bool(rings.counts.any()):  # (autoclip takes a quantile: its errors, before any grad is written)
            _check_quantile(self.global_quantile, rings.dtype)
        threshold = rings.thresholds(None, float(self.global_quantile))[0]
        # torch's clip_grad_norm_(max_norm=threshold): float(threshold), then reciprocal and multiply
        coef = torch.clamp((total + 1e-6).reciprocal() * threshold.to(total.dtype), max=1.0)
        whole.scale(coef)
        rings.record_keeping(None, total.to(rings.dtype).reshape(1), int(self.global_history_length))
        self.last_norms, self.last_thresholds = total, threshold

    # ------------------------------------------------------------ statistics

    @property
    def last_coefs(self) -> torch.Tensor | None:
        """The last step's coefficients (1 where nothing was clipped), as the clip
        computed them: clamp(threshold / (norm + 1e-6), max=1), torch's rounding."""
        if self.last_norms is None:
            return None
        norms = self.last_norms
        return torch.clamp((norms + 1e-6).reciprocal() * self.last_thresholds.to(norms.dtype), max=1.0)

    @property
    def last_clipped(self) -> torch.Tensor | None:
        """Which grads (the total, in global mode) the last step clipped."""
        coefs = self.last_coefs
        return None if coefs is None else coefs < 1.0

    def stats(self) -> dict:
        """The last step's norms, thresholds, coefficients and whether each clipped, as device tensors."""
        return {
            "norms": self.last_norms,
            "thresholds": self.last_thresholds,
            "coefs": self.last_coefs,
            "clipped": self.last_clipped,
        }

    # ------------------------------------------------------------ autoclip's state dict

    def state_dict(self) -> dict:
        groups = []
        for group in self.parameter_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [id(p) for p in group["params"]]
            groups.append(packed)
        state: dict = {}
        if self.global_threshold:
            if self._global is not None:
                state["global_history"] = self._global.history(0)
            elif "global_history" in self._pending:
                state["global_history"] = self._pending["global_history"]
        else:
            for group in self.parameter_groups:
                for p in group["params"]:
                    if p in self._row:
                        key, row = self._row[p]
                        state[id(p)] = {"history": self._rings[key].history(row)}
                    elif p in self._pending:
                        state[id(p)] = {"history": self._pending[p]}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of autoclip's QuantileClip."""
        loaded = copy.deepcopy(state_dict)
        saved_groups = loaded["param_groups"]
        if len(self.parameter_groups) != len(saved_groups):
            raise ValueError(
                f"Loaded state dict has {len(saved_groups)} parameter groups, Clipper {type(self).__name__} has "
                f"{len(self.parameter_groups)} parameter groups"
            )
        if any(len(a["params"]) != len(b["params"]) for a, b in zip(self.parameter_groups, saved_groups)):
            raise ValueError(
                "Loaded state dict contains a parameter group that doesn't match the size of Clipper "
                f"{type(self).__name__}'s group"
            )
        by_id = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.parameter_groups),
            )
        )
        pending = {}  # read whole before anything changes: a bad entry leaves the clipper as it was
        for key, value in loaded["state"].items():
            if key in by_id:
                if not isinstance(value, dict):
                    raise TypeError(
                        f"QuantileClip.load_state_dict: a parameter's state is a dict (its 'history'), "
                        f"not {type(value).__name__}"
                    )
                if "history" in value:  # (an empty state: no history yet, as autoclip starts one)
                    pending[by_id[key]] = value["history"]
            elif key == "global_history" and isinstance(value, torch.Tensor):
                pending["global_history"] = value
        for local, saved in zip(self.parameter_groups, saved_groups):
            saved["params"] = local["params"]
        self.parameter_groups = saved_groups
        self._rings, self._row, self._global, self._pending = {}, {}, None, pending
        self._params = list(chain.from_iterable(g["params"] for g in self.parameter_groups))
        self._layout = None

    @classmethod
    def as_optimizer(
        cls, optimizer, quantile=0.9, history_length=1000, global_threshold=False, *, backend=None
    ) -> OptimizerWithClipping:
        """`optimizer` wrapped so that every step() clips first (autoclip's as_optimizer)."""
        params = chain.from_iterable(group["params"] for group in optimizer.param_groups)
        clipper = cls(params, quantile=quantile, history_length=history_length, global_threshold=global_threshold,
                      backend=backend)  # fmt: skip
        return OptimizerWithClipping(optimizer, clipper)

    def __repr__(self) -> str:
        text = self.__class__.__name__ + " ("
        for i, group in enumerate(self.parameter_groups):
            text += f"\nParameter Group {i}\n"
            for key in sorted(group.keys()):
                if key != "params":
                    text += f"    {key}: {group[key]}\n"
        return text + ")"


def _check_quantile(q, dtype: torch.dtype) -> None:
    """torch.quantile's own error for a quantile it refuses (out of [0, 1],
    NaN, a tensor of another dtype than the history): autoclip meets it at
    a step that takes a quantile, before that step writes any grad."""
    if isinstance(q, torch.Tensor) or not 0.0 <= q <= 1.0:
        device = q.device if isinstance(q, torch.Tensor) else "cpu"
        torch.quantile(torch.zeros(1, dtype=dtype, device=device), q)


def _check_history_length(length) -> None:
    """A history_length set to zero or less during the run: autoclip's slice
    [-length:] then keeps everything (0) or drops the oldest (< 0); the rings
    cannot, so it is refused (README), with autoclip's message for such a
    setting, before any grad is written."""
    if int(length) <= 0:
        raise ValueError("QuantileClip history length must be greater than zero.")


def _history_kind(gathered) -> torch.dtype | None:
    """The history dtype of every grad when they share one (float64 for
    float64 grads, else float32), else None."""
    if gathered.work is None:
        return None
    dtypes = gathered.work.dtypes
    return F64 if dtypes == {F64} else F32 if F64 not in dtypes else None


class OptimizerWithClipping(torch.optim.Optimizer):
    """An optimizer whose step() runs the clipper first; its state dict holds
    both (autoclip's OptimizerWithClipping).  Everything else is the wrapped
    optimizer's, so LR schedulers and GradScaler see it as that optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, clipper) -> None:  # noqa: D107 - not Optimizer.__init__
        self.optimizer = optimizer
        self.clipper = clipper

    def step(self, closure=None):
        self.clipper.step()
        return self.optimizer.step(closure=closure)

    def add_param_group(self, param_group, **kwargs) -> None:
        self.optimizer.add_param_group(param_group=param_group)
        self.clipper.add_param_group(param_group, **kwargs)

    def zero_grad(self, set_to_none: bool = False) -> None:  # autoclip's default
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self):
        return {"optimizer": self.optimizer, "clipper": self.clipper}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "clipper": self.clipper.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.clipper.load_state_dict(state_dict["clipper"])

    def __repr__(self) -> str:
        return f"OptimizerWithClipping (\n{self.optimizer}\n{self.clipper})"

    def __getattr__(self, attr):
        if attr in ("optimizer", "clipper"):  # not set yet (unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.optimizer, attr)
