"""torch.compile support: fastclip's operations as torch custom ops.

Dynamo cannot trace into the C++ gather or the kernels, so while a function
is being compiled the public functions come here instead: the parameters'
.grad are read in traced Python, and the fused work is one custom op
(`torch.ops.fastclip.*`) with a fake implementation that gives the result's
dtype and device.  A compiled training step that clips therefore compiles
with fullgraph=True, and at run time the op runs the same eager code as an
uncompiled call, so results are the same bits.  What the fused path does not
take (DTensor grads, norm types other than 1, 2, inf, a tensor max_norm) is
left to torch's own clip_grad functions, which Dynamo traces.

torch's four functions have an op each; the other methods share two generic
ops, `fastclip::method_` (writes the grads) and `fastclip::method` (reads
them), which take the method's name.  The eager code behind every op is
registered here by the module that defines it (register()), so this module
imports none of them.
"""

from __future__ import annotations

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


@custom_op("fastclip::clip_grad_norm_", mutates_args=("grads",))
def _clip_grad_norm_op(
    grads: list[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool,
    foreach: bool | None, backend: str,
) -> torch.Tensor:  # fmt: skip
    return _eager("clip_grad_norm_")(holders(grads), max_norm, norm_type, error_if_nonfinite, foreach,
                                      backend=_backend(backend))  # fmt: skip


@custom_op("fastclip::get_total_norm", mutates_args=())
def _get_total_norm_op(
    tensors: list[torch.Tensor], norm_type: float, error_if_nonfinite: bool, foreach: bool | None, backend: str
) -> torch.Tensor:
    return _eager("get_total_norm")(tensors, norm_type, error_if_nonfinite, foreach, backend=_backend(backend))


@custom_op("fastclip::clip_grads_with_norm_", mutates_args=("grads",))
def _clip_grads_with_norm_op(
    grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor, foreach: bool | None, backend: str
) -> None:
    _eager("clip_grads_with_norm_")(holders(grads), max_norm, total_norm, foreach, backend=_backend(backend))


@custom_op("fastclip::clip_grad_value_", mutates_args=("grads",))
def _clip_grad_value_op(grads: list[torch.Tensor], clip_value: float, foreach: bool | None, backend: str) -> None:
    _eager("clip_grad_value_")(holders(grads), clip_value, foreach, backend=_backend(backend))


@custom_op("fastclip::method_", mutates_args=("grads",))
def _method_op(
    name: str, grads: list[torch.Tensor], weights: list[torch.Tensor], numbers: list[float], ints: list[int],
    values: torch.Tensor | None, backend: str,
) -> torch.Tensor:  # fmt: skip
    """A method that writes the grads (the registered eager code, by name): its
    one result (an empty tensor for methods that return nothing; functionalization
    takes no list of results from an op that mutates)."""
    return _eager(name)(grads, weights, numbers, ints, values, _backend(backend))[0]


@custom_op("fastclip::method", mutates_args=())
def _method_read_op(name: str, grads: list[torch.Tensor], numbers: list[float], backend: str) -> list[torch.Tensor]:
    """A method that only reads the grads."""
    return _eager(name)(grads, [], numbers, [], None, _backend(backend))


@_method_op.register_fake
def _(name, grads, weights, numbers, ints, values, backend):
    return _REGISTERED[name][1](grads, numbers, ints)[0]


@_method_read_op.register_fake
def _(name, grads, numbers, backend):
    return _REGISTERED[name][1](grads, numbers, [])


def method_(name: str, grads, weights=(), numbers=(), ints=(), values=None, backend=None) -> torch.Tensor:
    """Call the method `name` through the generic writing op (in traced code)."""
    return torch.ops.fastclip.method_(name, list(grads), list(weights), [float(x) for x in numbers],
                                      [int(i) for i in ints], values, backend or "")  # fmt: skip


def nothing() -> list:
    """The result of a method that returns nothing, through method_."""
    return [torch.empty(0)]


def method(name: str, grads, numbers=(), backend=None) -> list:
    """Call the method `name` through the generic reading op (in traced code)."""
    return torch.ops.fastclip.method(name, list(grads), [float(x) for x in numbers], backend or "")


def plain(tensors) -> bool:
    """Plain tensors of the kernels' dtypes: what the generic ops take."""
    return _plain(tensors)


def _fake_total(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:  # torch's tensor(0.) for an empty list
        return torch.empty((), dtype=torch.get_default_dtype(), device="cpu")
    return torch.empty((), dtype=promoted_dtype(t.dtype for t in tensors), device=tensors[0].device)


@_clip_grad_norm_op.register_fake
def _(grads, max_norm, norm_type, error_if_nonfinite, foreach, backend):
    return _fake_total(grads)


@_get_total_norm_op.register_fake
def _(tensors, norm_type, error_if_nonfinite, foreach, backend):
    return _fake_total(tensors)


@_clip_grads_with_norm_op.register_fake
def _(grads, max_norm, total_norm, foreach, backend):
    return None


@_clip_grad_value_op.register_fake
def _(grads, clip_value, foreach, backend):
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
    return bool(tensors) and all(type(t) is torch.Tensor and t.dtype in DTYPE_CODES for t in tensors)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, backend):
    parameters, grads = _params_and_grads(parameters)
    if _plain(grads) and _number(max_norm) and _number(norm_type) and float(norm_type) in FUSED_NORM_KINDS:
        return torch.ops.fastclip.clip_grad_norm_(
            grads, float(max_norm), float(norm_type), bool(error_if_nonfinite), foreach, backend or ""
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
        torch.ops.fastclip.clip_grads_with_norm_(grads, float(max_norm), total_norm, foreach, backend or "")
        return None
    return torch_ref.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)


def clip_grad_value_(parameters, clip_value, foreach, backend):
    parameters, grads = _params_and_grads(parameters)
    if _plain(grads) and _number(clip_value):
        torch.ops.fastclip.clip_grad_value_(grads, float(clip_value), foreach, backend or "")
        return None
    return torch_ref.clip_grad_value_(parameters, clip_value, foreach)
