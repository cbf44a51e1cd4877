"""torch.compile support: fastclip's operations as torch custom ops.

Dynamo cannot trace into the C++ gather or the kernels, so while a function
is being compiled the public functions come here instead: the parameters'
.grad are read in traced Python, and the fused work is one custom op
(`torch.ops.fastclip.*`) with a fake implementation that gives the result's
dtype and device.  A compiled training step that clips therefore compiles
with fullgraph=True, and at run time the op runs the same eager code as an
uncompiled call, so results are the same bits.  What the fused path does not
take (DTensor grads, norm types other than 1, 2, inf, a tensor max_norm) is
left to torch's own clip_grad functions, which Dynamo traces.  A number that
Dynamo holds symbolically (a threshold that changed between calls) reaches
an op in a host tensor (`carried`), so one graph serves every value; such
calls go to a twin of the op tagged cudagraph_unsafe (below).

torch's four functions have an op each; the other methods share two generic
ops, `fastclip::method_` (writes the grads) and `fastclip::method` (reads
them), which take the method's name.  The eager code behind every op is
registered here by the module that defines it (register()), so this module
imports none of them.
"""

from __future__ import annotations

import inspect

import torch
from torch.library import custom_op

from ._work import DTYPE_CODES, as_list, promoted_dtype
from .backends import torch_ref
from .backends.base import FUSED_NORM_KINDS

# name -> (eager implementation, fake implementation), from register()
_REGISTERED: dict = {}


def register(name: str, eager, fake=None) -> None:
    """The eager code behind the op `name` (a torch function's name, or a
    method's for the generic ops) and, for the generic ops, its fake:
    fake(grads, numbers, ints) -> list of empty result tensors."""
    _REGISTERED[name] = (eager, fake)


def _eager(name: str):
    return _REGISTERED[name][0]


class _Grad:
    """Stands in for a parameter: the eager API reads `.grad`."""

    __slots__ = ("grad",)

    def __init__(self, grad):
        self.grad = grad


def holders(grads):
    """Stand-ins with a .grad for grads the eager code reads from parameters."""
    return [_Grad(g) for g in grads]


def _backend(name: str):
    return name or None  # "" stands for None: $FASTCLIP_BACKEND, read at run time


# ---------------------------------------------------------------- the ops

# A CUDA graph replays its kernels without running Python again, so an op that
# read a carried number on the host would keep the value of the recorded call.
# Each op that takes one therefore has a twin, `<name>_carried`, which the
# traced code calls when a number is carried; the twin is tagged
# cudagraph_unsafe, so Inductor leaves it out of its CUDA graphs (a partition
# of its own, or no graph).  A constant threshold still reaches the plain op,
# which CUDA graphs capture.
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)  # (absent in older torch)
if "tags" not in inspect.signature(custom_op).parameters:  # (custom_op without tags: older torch)
    _CUDAGRAPH_UNSAFE = None


def carried_name(name: str) -> str:
    """The name of the twin of the op `name` that takes carried numbers."""
    return name[:-1] + "_carried_" if name.endswith("_") else name + "_carried"


class _Twins:
    """An op and its twin for carried numbers: the same code and schema."""

    def __init__(self, name: str, mutates_args, fn):
        tags = {} if _CUDAGRAPH_UNSAFE is None else {"tags": (_CUDAGRAPH_UNSAFE,)}
        self.plain = custom_op(f"fastclip::{name}", mutates_args=mutates_args)(fn)
        self.carried = custom_op(f"fastclip::{carried_name(name)}", mutates_args=mutates_args, **tags)(fn)

    def register_fake(self, fake):
        self.plain.register_fake(fake)
        self.carried.register_fake(fake)
        return fake


def _twins(name: str, mutates_args):
    return lambda fn: _Twins(name, mutates_args, fn)


def _op(name: str, carried: torch.Tensor | None):
    """The op `name`, or its twin when numbers are carried."""
    return getattr(torch.ops.fastclip, name if carried is None else carried_name(name))


@_twins("clip_grad_norm_", mutates_args=("grads",))
def _clip_grad_norm_op(
    grads: list[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool,
    foreach: bool | None, backend: str, carried: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    max_norm = _uncarried(carried, [max_norm])[0]
    return _eager("clip_grad_norm_")(holders(grads), max_norm, norm_type, error_if_nonfinite, foreach,
                                      backend=_backend(backend))  # fmt: skip


@custom_op("fastclip::get_total_norm", mutates_args=())
def _get_total_norm_op(
    tensors: list[torch.Tensor], norm_type: float, error_if_nonfinite: bool, foreach: bool | None, backend: str
) -> torch.Tensor:
    return _eager("get_total_norm")(tensors, norm_type, error_if_nonfinite, foreach, backend=_backend(backend))


@_twins("clip_grads_with_norm_", mutates_args=("grads",))
def _clip_grads_with_norm_op(
    grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor, foreach: bool | None, backend: str,
    carried: torch.Tensor | None = None,
) -> None:  # fmt: skip
    max_norm = _uncarried(carried, [max_norm])[0]
    _eager("clip_grads_with_norm_")(holders(grads), max_norm, total_norm, foreach, backend=_backend(backend))


@_twins("clip_grad_value_", mutates_args=("grads",))
def _clip_grad_value_op(
    grads: list[torch.Tensor], clip_value: float, foreach: bool | None, backend: str,
    carried: torch.Tensor | None = None,
) -> None:  # fmt: skip
    clip_value = _uncarried(carried, [clip_value])[0]
    _eager("clip_grad_value_")(holders(grads), clip_value, foreach, backend=_backend(backend))


@_twins("method_", mutates_args=("grads",))
def _method_op(
    name: str, grads: list[torch.Tensor], weights: list[torch.Tensor], numbers: list[float], ints: list[int],
    values: torch.Tensor | None, backend: str, carried: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """A method that writes the grads (the registered eager code, by name): its
    one result (an empty tensor for methods that return nothing; functionalization
    takes no list of results from an op that mutates)."""
    numbers = _uncarried(carried, numbers)
    return _eager(name)(grads, weights, numbers, ints, values, _backend(backend))[0]


@_twins("method", mutates_args=())
def _method_read_op(
    name: str, grads: list[torch.Tensor], numbers: list[float], backend: str, carried: torch.Tensor | None = None
) -> list[torch.Tensor]:  # fmt: skip
    """A method that only reads the grads."""
    return _eager(name)(grads, [], _uncarried(carried, numbers), [], None, _backend(backend))


@_method_op.register_fake
def _(name, grads, weights, numbers, ints, values, backend, carried=None):
    return _REGISTERED[name][1](grads, numbers, ints)[0]


@_method_read_op.register_fake
def _(name, grads, numbers, backend, carried=None):
    return _REGISTERED[name][1](grads, numbers, [])


# ---------------------------------------------------------------- numbers Dynamo holds symbolically


def _symbolic(x) -> bool:
    """Is `x` a number Dynamo traces symbolically?  A Python number argument
    is a constant of the first graph; when a later call brings another value,
    Dynamo compiles again with it symbolic (automatic dynamic).  An op's float
    argument would specialise it back to a constant (one graph per value), so
    such numbers travel in a tensor.  isinstance and type() see a float either
    way; what tells them apart is that Dynamo (torch 2.13) resolves a constant's
    __class__ to the float builtin and cannot for a symbolic one.  torch 2.11's
    Dynamo resolves neither, so there every number is carried (the same
    results; the twin op, left out of CUDA graphs).  Were a Dynamo to resolve
    both, numbers would go as constants: one graph per value
    (test_a_number_that_changes_between_calls_compiles_twice would say so)."""
    plain = isinstance(x, (int, float)) and not isinstance(x, bool)
    return plain and x.__class__ is not float and x.__class__ is not int


def _carry(numbers) -> tuple[list[float], torch.Tensor | None]:
    """The numbers for an op: (the floats, None) when Dynamo holds every one
    as a constant; otherwise ([], all of them in a 1-D float64 tensor on the
    host), which Dynamo keeps symbolic, so one graph serves every value.  The
    op reads it back with .tolist(): exact, and no wait on a device."""
    numbers = list(numbers)
    if not any(_symbolic(x) for x in numbers):
        return [float(x) for x in numbers], None
    one = torch.ones((), dtype=torch.float64, device="cpu")
    return [], torch.stack([one * x for x in numbers])


def _carry_one(x) -> tuple[float, torch.Tensor | None]:
    """One number for an op's float argument: (x, None), or (0.0, x carried)."""
    numbers, carried = _carry([x])
    return (numbers[0] if carried is None else 0.0), carried


def _uncarried(carried: torch.Tensor | None, numbers: list[float]) -> list[float]:
    """The numbers an op was given, from its `carried` tensor where there is one."""
    return numbers if carried is None else carried.tolist()


def method_(name: str, grads, weights=(), numbers=(), ints=(), values=None, backend=None) -> torch.Tensor:
    """Call the method `name` through the generic writing op (in traced code)."""
    numbers, carried = _carry(numbers)
    return _op("method_", carried)(name, list(grads), list(weights), numbers, [int(i) for i in ints], values,
                                   backend or "", carried)  # fmt: skip


def nothing() -> list:
    """The result of a method that returns nothing, through method_."""
    return [torch.empty(0)]


def method(name: str, grads, numbers=(), backend=None) -> list:
    """Call the method `name` through the generic reading op (in traced code)."""
    numbers, carried = _carry(numbers)
    return _op("method", carried)(name, list(grads), numbers, backend or "", carried)


def plain(tensors) -> bool:
    """Plain tensors of the kernels' dtypes: what the generic ops take."""
    return _plain(tensors)


def _fake_total(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:  # torch's tensor(0.) for an empty list
        return torch.empty((), dtype=torch.get_default_dtype(), device="cpu")
    return torch.empty((), dtype=promoted_dtype(t.dtype for t in tensors), device=tensors[0].device)


@_clip_grad_norm_op.register_fake
def _(grads, max_norm, norm_type, error_if_nonfinite, foreach, backend, carried=None):
    return _fake_total(grads)


@_get_total_norm_op.register_fake
def _(tensors, norm_type, error_if_nonfinite, foreach, backend):
    return _fake_total(tensors)


@_clip_grads_with_norm_op.register_fake
def _(grads, max_norm, total_norm, foreach, backend, carried=None):
    return None


@_clip_grad_value_op.register_fake
def _(grads, clip_value, foreach, backend, carried=None):
    return None


# ---------------------------------------------------------------- traced entry points


def _params_and_grads(parameters) -> tuple[list, list]:
    parameters = as_list(parameters)
    return parameters, [p.grad for p in parameters if p.grad is not None]


def _plain(tensors) -> bool:
    """Plain tensors of the kernels' dtypes (others go to traced torch, whose
    results the fake implementations would not describe, e.g. complex).  No
    tensors at all go to traced torch too (Inductor cannot take a mutating op
    on an empty list)."""
    return len(tensors) > 0 and all(type(t) is torch.Tensor and t.dtype in DTYPE_CODES for t in tensors)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, backend):
    parameters, grads = _params_and_grads(parameters)
    if _plain(grads) and _number(max_norm) and _number(norm_type) and float(norm_type) in FUSED_NORM_KINDS:
        max_norm, carried = _carry_one(max_norm)
        return _op("clip_grad_norm_", carried)(
            grads, max_norm, float(norm_type), bool(error_if_nonfinite), foreach, backend or "", carried
        )
    return torch_ref.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


def get_total_norm(tensors, norm_type, error_if_nonfinite, foreach, backend):
    tensors = as_list(tensors)
    if _plain(tensors) and _number(norm_type) and float(norm_type) in FUSED_NORM_KINDS:
        return torch.ops.fastclip.get_total_norm(
            tensors, float(norm_type), bool(error_if_nonfinite), foreach, backend or ""
        )
    return torch_ref.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach, backend):
    parameters, grads = _params_and_grads(parameters)
    if _plain(grads) and _number(max_norm) and type(total_norm) is torch.Tensor:
        max_norm, carried = _carry_one(max_norm)
        _op("clip_grads_with_norm_", carried)(grads, max_norm, total_norm, foreach, backend or "", carried)
        return None
    return torch_ref.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)


def clip_grad_value_(parameters, clip_value, foreach, backend):
    parameters, grads = _params_and_grads(parameters)
    if _plain(grads) and _number(clip_value):
        clip_value, carried = _carry_one(clip_value)
        _op("clip_grad_value_", carried)(grads, clip_value, foreach, backend or "", carried)
        return None
    return torch_ref.clip_grad_value_(parameters, clip_value, foreach)
