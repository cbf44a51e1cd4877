"""The flat description of one call's gradients that a fused backend receives.

`collect(items, from_params)` gathers the grads and turns them into a tensor
table (addresses, element counts, dtype codes, plus sizes and strides for the
rare non-dense view), or says why no fused backend may take them, in which
case the call goes to torch unchanged.  This runs on every call and, for 2000
tiny grads, is most of the host time: the common case (plain, contiguous
tensors, all on the CPU or all on one CUDA device) is gathered in C++
(csrc/python/collect.cpp); `describe` is the general path.
"""

from __future__ import annotations

import functools
from operator import attrgetter

import torch

# The tensor table, its fast gather and the CPU kernels live in fastclip._cpu.
from ._ext import CPU_IMPORT_ERROR as EXT_IMPORT_ERROR
from ._ext import DTYPE_CODES
from ._ext import cpu as _ext

MAX_STRIDED_DIMS = 8  # csrc/common/tensor_table.h kMaxDims

_grad_of = attrgetter("grad")
_dtype_of = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")
_device_of = attrgetter("device")
_PLAIN_TENSORS = {torch.Tensor, torch.nn.Parameter}  # (a Parameter adds no behaviour to its data)
NOT_TENSORS = "items that are not tensors"  # (torch raises its own error for them, whatever the backend)
_CPU = torch.device("cpu")


class GradList:
    """The gradients of one call, all on one device, as a tensor table."""

    __slots__ = ("tensors", "device", "dtypes", "_table", "_lists")

    def __init__(self, tensors, device, dtypes, table=None, lists=None):
        self.tensors = tensors  # keeps the memory alive while kernels run
        self.device = device
        self.dtypes = dtypes  # the distinct dtypes
        self._table = table
        self._lists = lists  # (ptrs, numels, dtype codes, [(index, sizes, strides)])

    @property
    def table(self):
        """The fastclip._cpu.TensorTable that kernels read."""
        if self._table is None:
            self._table = _ext.TensorTable(*self._lists)
        return self._table

    @property
    def result_dtype(self) -> torch.dtype:
        """dtype torch gives the total norm: the promotion of all grad dtypes."""
        return promoted_dtype(self.dtypes)

    def strided_indices(self) -> list[int]:
        """Indices of the grads that are views, not one dense block (the GPU
        backends leave them to the host: see triton_backend.py)."""
        return [] if self._lists is None else [i for i, _sizes, _strides in self._lists[3]]

    def with_dense_copies(self) -> GradList:
        """This list, with every view that is not one dense block replaced by
        a contiguous copy (read-only uses: the GPU backends' norm)."""
        strided = self.strided_indices()
        if not strided:
            return self
        tensors, ptrs = list(self.tensors), list(self._lists[0])
        for i in strided:
            tensors[i] = tensors[i].contiguous()
            ptrs[i] = tensors[i].data_ptr()
        return GradList(tensors, self.device, self.dtypes, lists=(ptrs, self._lists[1], self._lists[2], []))

    def scales_unlike_torch(self, coef_dtype: torch.dtype) -> bool:
        """Whether torch's `grad.mul_(coef)` by a 0-dim `coef_dtype` tensor
        rounds differently from the kernels for some grad: a 0-dim grad
        narrower than a float64 coefficient (two 0-dim operands promote, so
        torch multiplies in float64 and rounds once; every other grad it
        multiplies in the grad's own precision, as the kernels do).  Rare
        (float64 beside a narrower 0-dim parameter): such scaling goes to torch."""
        if coef_dtype != torch.float64:
            return False
        return any(t.dim() == 0 and t.dtype != torch.float64 for t in self.tensors)

    def has_empty(self) -> bool:
        return self._table.has_empty() if self._table is not None else 0 in self._lists[1]

    def mark_modified(self) -> None:
        """Bump autograd version counters, as torch's in-place ops would."""
        increment_version(self.tensors)


def promoted_dtype(dtypes) -> torch.dtype:
    """torch's type promotion over `dtypes` (at least one): the dtype of a norm of tensors of these dtypes."""
    return functools.reduce(torch.promote_types, dtypes)


def as_list(items) -> list:
    """A tensor or an iterable of tensors (or parameters), as torch's clip functions take them, as a list."""
    return [items] if isinstance(items, torch.Tensor) else list(items)


def collect(items: list, from_params: bool, sign_matters: bool = False) -> tuple[list, GradList | None, str]:
    """(grads, GradList, "") or (grads, None, why no fused backend may take them).

    With from_params, `items` are parameters and the grads are their non-None
    .grad, read once each (torch's AttributeError for anything else).
    sign_matters: the operation is not odd in x (clamping to a negative
    clip_value), so views with torch's negative bit must go to torch; only
    the general path checks for them."""
    if _ext is not None:
        grads, table, dtype_mask, cuda_index = _ext.collect(
            items, from_params, DTYPE_CODES, torch.Tensor, torch.nn.Parameter
        )
        if table is not None and not sign_matters:
            device = _CPU if cuda_index < 0 else _cuda_device(cuda_index)
            return grads, GradList(grads, device, _dtypes_of_mask(dtype_mask), table=table), ""
    else:
        grads = [g for g in map(_grad_of, items) if g is not None] if from_params else items
    return (grads, *describe(grads, sign_matters))


@functools.cache
def _cuda_device(index: int) -> torch.device:
    return torch.device("cuda", index)


@functools.cache
def _dtypes_of_mask(mask: int) -> frozenset:
    return frozenset(d for d, code in DTYPE_CODES.items() if mask >> code & 1)


def describe(grads: list, sign_matters: bool = False) -> tuple[GradList | None, str]:
    """Return (GradList, "") or (None, why the fused backends cannot take these grads)."""
    types = set(map(type, grads))
    if not all(issubclass(t, torch.Tensor) for t in types):
        return None, NOT_TENSORS
    if not types or not types <= _PLAIN_TENSORS:
        return None, "grads that are not plain torch.Tensor (tensor subclasses such as DTensor)"
    dtypes = list(map(_dtype_of, grads))
    distinct = set(dtypes)
    unsupported = [d for d in distinct if d not in DTYPE_CODES]
    if unsupported:
        return None, f"grads of dtype {unsupported[0]} (fused kernels take float32, float64, float16, bfloat16)"
    if all(map(_is_cpu, grads)):
        device = _CPU
    else:
        devices = set(map(_device_of, grads))
        if len(devices) > 1:
            return None, "grads on several devices"
        device = devices.pop()
    try:
        contiguous = list(map(torch.Tensor.is_contiguous, grads))
        ptrs = list(map(torch.Tensor.data_ptr, grads))
    except RuntimeError:
        return None, "sparse or other grads without strided storage"
    # Kernels read raw memory: a view with the negative bit holds -x.  Norms and
    # scaling are odd or even in x, so only clamping to a negative value cares.
    if sign_matters and any(map(torch.Tensor.is_neg, grads)):
        return None, "views with the negative bit (e.g. .imag of a conjugated tensor)"
    numels = list(map(torch.Tensor.numel, grads))
    strided = []
    if not all(contiguous):
        for i, is_contiguous in enumerate(contiguous):
            if is_contiguous or numels[i] == 0:
                continue
            layout = strided_layout(grads[i].shape, grads[i].stride())
            if layout is None:
                continue  # a permuted dense block: one span from data_ptr
            if layout is False:
                return None, "grads whose elements overlap in memory (expanded views) or with over 8 strided dims"
            strided.append((i, layout[0], layout[1]))
    codes = [DTYPE_CODES[d] for d in dtypes]
    return GradList(grads, device, distinct, lists=(ptrs, numels, codes, strided)), ""


def strided_layout(shape, strides):
    """Classify a non-contiguous, non-empty layout.

    Returns None if the elements fill one dense block (any dimension order:
    transposed grads are processed over their storage), False if elements
    overlap or too many dimensions remain, else the coalesced (sizes, strides),
    innermost last.
    """
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    expected = 1
    for n, s in sorted(dims, key=lambda d: d[1]):
        if s != expected:
            break
        expected *= n
    else:
        return None
    # Merge a dimension into the next when they walk memory as one.
    merged = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    # No overlap if, by increasing stride, each stride exceeds the reach of the smaller ones.
    reach = 0
    for n, s in sorted(merged, key=lambda d: d[1]):
        if s <= reach:
            return False
        reach += (n - 1) * s
    if len(merged) > MAX_STRIDED_DIMS:
        return False
    return [n for n, _ in merged], [s for _, s in merged]


def increment_version(tensors) -> None:
    try:
        torch._C._increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch._C._increment_version(t)
