"""python -m tests.compile_kernels ARCH: compile the Triton kernels for
sm_ARCH without a GPU and print, per kernel, how many 16-byte vector loads
and stores the PTX has (JSON).  Used by tests/test_triton.py.  Compiling
catches what the interpreter cannot: a constexpr branch the interpreter
skips is still type-checked by the compiler (sm_90: every kernel, the
segmented core's with every flag; other architectures: two)."""

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
    options = {"num_warps": GPU_CONFIG.num_warps, "enable_fp_fusion": False}  # as the backend launches them
    return triton.compile(src, target=target, options=options).asm["ptx"]


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
        "scale_kernel unaligned": (K.scale_kernel, {**table, "coef_ptr": "*fp32"}, {**common, "ALIGNED": False}),
        # the segmented core: every method's reduce (counts: grad_stats; weights: AGC), finish and apply
        "segment_apply_kernel": (K.segment_apply_kernel, {**table, "coefs": "*fp64"}, common),
    }  # fmt: skip
    segment = {**table, "n_segments": "i32", "filled": "i32", "unit_parts": "*fp64", "unit_weight_parts": "*fp64",
               "segment_counter": "*i32", "done_counter": "*i32", "powers": "*fp64", "weight_powers": "*fp64",
               "counts": "*i64", "max_norms": "*fp64", "max_norms_len": "i32", "clip_factor_bits": "i64",
               "eps_bits": "i64", "norms": "*fp32", "coefs": "*fp64", "total": "*fp32"}  # fmt: skip
    finish = {k: segment[k] for k in ("table", "n_rows", "n_segments", "powers", "weight_powers", "max_norms",
                                      "max_norms_len", "clip_factor_bits", "eps_bits", "norms", "coefs", "total")}  # fmt: skip
    weights = dict(W_F32=True, W_F64=True, W_F16=True, W_BF16=True)
    for mode, kind in ((0, 2), (1, 3), (2, 1)):  # (coefficient modes: csrc/common/coefficients.h)
        flags = dict(MODE=mode, KIND=kind, WEIGHTS=True, NORMS=True, TOTAL=True, FINISH_BLOCK=1024)
        variants[f"segment_reduce_kernel mode {mode} kind {kind}"] = (
            K.segment_reduce_kernel, segment, {**common, **weights, **flags, "COUNTS": True, "FINISH": True})
        variants[f"segment_finish_kernel mode {mode} kind {kind}"] = (K.segment_finish_kernel, finish, flags)
    if arch != 90:  # the other architectures: one norm and the scale (compiling takes a while)
        variants = {k: v for k, v in variants.items() if k in ("norm_kernel L2 -> bf16", "scale_kernel")}
    counts = {}
    for name, (kernel, signature, constexprs) in variants.items():
        ptx = compile_ptx(kernel, signature, constexprs, arch)
        if "finish" in name:  # (no bulk loads: a few values per segment)
            counts[name] = {"v4_loads": None, "v4_stores": None, "fma": len(re.findall(r"\bfma\.", ptx))}
            continue
        counts[name] = {
            "v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
            "v4_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
            "fma": len(re.findall(r"\bfma\.", ptx)),  # (none: sums round as in the interpreter)
        }
    return counts


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
