"""The compiled extensions, loaded in one place, and the codes they define.

fastclip._cpu      the CPU kernels, the tensor table and its fast gather (every
                   fused backend needs it: the GPU backends build their tables there)
fastclip._cuda     the CUDA kernels (built with nvcc)
fastclip._cuda_emu the same CUDA kernels compiled for the CPU against an emulation (tests)

Each is None when it is not built (or built for another Python); the
*_IMPORT_ERROR strings say why.  The dtype codes, norm kinds and coefficient
modes are defined once, in csrc/common, and read from fastclip._cpu.
"""

from __future__ import annotations

import torch

# (plain imports, not importlib: tests simulate a missing extension through __import__)
try:
    from . import _cpu as cpu

    CPU_IMPORT_ERROR = ""
except ImportError as exc:  # not built, or built for another Python
    cpu, CPU_IMPORT_ERROR = None, f"{type(exc).__name__}: {exc}"
try:
    from . import _cuda as cuda

    CUDA_IMPORT_ERROR = ""
except ImportError as exc:  # built without nvcc, or for another Python
    cuda, CUDA_IMPORT_ERROR = None, f"{type(exc).__name__}: {exc}"
try:
    from . import _cuda_emu as cuda_emu
except ImportError:  # not built (it needs Linux's ucontext)
    cuda_emu = None

if cpu is not None:
    # torch >= 2.10 publishes DLPack's C exchange API: one C call describes a tensor
    cpu.set_dlpack_exchange_api(getattr(torch.Tensor, "__dlpack_c_exchange_api__", None))

# The codes, from the extension.  Without it nothing fused runs, but grads
# are still described (so that "auto" can say why it hands them to torch)
# with the same values, written here only for that case
# (tests/test_segments.py checks them against the extension's).
_DTYPES_BY_NAME = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WITHOUT_EXTENSION = {
    "DTYPE_CODES": {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3},
    "NORM_KINDS": {1.0: 1, 2.0: 2, float("inf"): 3},
    "COEFFICIENT_MODES": {"none": 0, "clip_norm": 1, "agc": 2},
}


def _codes(name: str) -> dict:
    return dict(getattr(cpu, name)) if cpu is not None else dict(_WITHOUT_EXTENSION[name])


# torch dtype -> the kernels' dtype code (csrc/common/dtypes.h)
DTYPE_CODES: dict = {_DTYPES_BY_NAME[name]: code for name, code in _codes("DTYPE_CODES").items()}
# norm type the kernels fuse -> its kind code (csrc/common/norm_kind.h)
NORM_KINDS: dict = _codes("NORM_KINDS")
# per-segment formula -> its code (csrc/common/coefficients.h): "none", "clip_norm", "agc"
COEFFICIENT_MODES: dict = _codes("COEFFICIENT_MODES")
