"""Builds fastclip's C++ extension.  Needs only setuptools, pybind11 and a C++17
compiler: the kernels are torch-independent (raw pointers, sizes, dtype codes),
so no torch is needed to build and one binary serves every torch version."""

import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup

ParallelCompile("FASTCLIP_BUILD_JOBS", default=0).install()  # compile the sources in parallel

if sys.platform == "win32":
    cpu_flags, cpu_link = ["/O2", "/fp:precise", "/openmp"], []
elif sys.platform == "darwin":  # Apple clang has no OpenMP: fastclip's own thread pool serves
    cpu_flags, cpu_link = ["-O3", "-ffp-contract=off", "-fno-math-errno"], []
else:
    # -ffp-contract=off: no fused multiply-adds, so every instruction set (the
    # AVX2 variant is chosen at run time) gives the same bits.  No -march: the
    # binary must run on any x86-64 (or other) CPU of its platform.
    # -fopenmp: parallel regions run on the process's libgomp, which is
    # torch's own (same soname) once torch is imported, as fastclip does first.
    cpu_flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi", "-fopenmp"]
    cpu_link = ["-fopenmp", "-pthread"]

ext_modules = [
    Pybind11Extension(
        "fastclip._cpu",
        sources=[
            "csrc/cpu/module.cpp",
            "csrc/cpu/row_kernels.cpp",
            "csrc/cpu/thread_pool.cpp",
            "csrc/cpu/work.cpp",
            "csrc/python/collect.cpp",
        ],
        include_dirs=["csrc"],
        depends=[
            "csrc/common/accumulate.h",
            "csrc/common/dtypes.h",
            "csrc/common/tensor_table.h",
            "csrc/common/unit_table.h",
            "csrc/python/collect.h",
            "csrc/python/dlpack_exchange.h",
            "csrc/cpu/row_kernels.h",
            "csrc/cpu/row_kernels_impl.h",
            "csrc/cpu/thread_pool.h",
            "csrc/cpu/work.h",
        ],
        cxx_std=17,
        extra_compile_args=cpu_flags,
        extra_link_args=cpu_link,
    ),
]

setup(ext_modules=ext_modules)
