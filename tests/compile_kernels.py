"""python -m tests.compile_kernels ARCH: compile the Triton kernels for
sm_ARCH without a GPU and print, per kernel, how many 16-byte vector loads
and stores the PTX has (JSON).  Used by tests/test_triton.py."""

from __future__ import annotations

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastclip.backends import triton_kernels as K
from fastclip.backends.triton_backend import GPU_CONFIG


def compile_ptx(kernel, signature: dict, constexprs: dict, arch: int) -> str:
    names = kernel.arg_names
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": GPU_CONFIG.num_warps}).asm["ptx"]


def main(arch: int) -> dict:
    common = dict(SEARCH_STEPS=9, BLOCK=GPU_CONFIG.block, ITERS=GPU_CONFIG.iters, ALIGNED=True,
                  HAS_F32=True, HAS_F64=True, HAS_F16=True, HAS_BF16=True)  # fmt: skip
    table = {"table": "*i64", "n_rows": "i32", "n_units": "i32"}
    bounds = {f"{n}_bits": "i32" for n in ("lo32", "hi32", "lo16", "hi16", "lo_bf16", "hi_bf16")}
    norm_args = {"partials": "*fp64", "counter": "*i32", "results": "*fp64", "max_norm_bits": "i64"}
    variants = {
        "norm_kernel L2 -> bf16": (K.norm_kernel, {**table, **norm_args, "total_out": "*bf16"},
                                   {**common, "KIND": 2, "RESULT_F64": False, "FINISH_BLOCK": 1024}),
        "norm_kernel inf -> fp64": (K.norm_kernel, {**table, **norm_args, "total_out": "*fp64"},
                                    {**common, "KIND": 3, "RESULT_F64": True, "FINISH_BLOCK": 1024}),
        "norm_kernel L1 -> fp32": (K.norm_kernel, {**table, **norm_args, "total_out": "*fp32"},
                                   {**common, "KIND": 1, "RESULT_F64": False, "FINISH_BLOCK": 1024}),
        "scale_kernel": (K.scale_kernel, {**table, "coef_ptr": "*fp32"}, common),
        "clamp_kernel": (K.clamp_kernel, {**table, **bounds, "lo64_bits": "i64", "hi64_bits": "i64"}, common),
    }  # fmt: skip
    if arch != 90:  # the other architectures: one norm and the scale (compiling takes a while)
        variants = {k: v for k, v in variants.items() if k in ("norm_kernel L2 -> bf16", "scale_kernel")}
    counts = {}
    for name, (kernel, signature, constexprs) in variants.items():
        ptx = compile_ptx(kernel, signature, constexprs, arch)
        counts[name] = {
            "v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
            "v4_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
        }
    return counts


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
