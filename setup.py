"""Builds fastclip's extensions.  Needs only setuptools, pybind11 and a C++17
compiler: the kernels are torch-independent (raw pointers, sizes, dtype codes),
so no torch is needed to build and one binary serves every torch version.

fastclip._cpu   the CPU kernels and the tensor table (always).
fastclip._cuda  the CUDA kernels, built with nvcc when one is found (no GPU
                needed to build): FASTCLIP_CUDA=1 requires it, =0 skips it;
                FASTCLIP_CUDA_ARCHS="80;90" (the default) picks the GPU
                architectures, the last one also as PTX for newer GPUs.  The
                CUDA runtime is linked statically.
fastclip._cuda_emu  the CUDA kernels compiled for the CPU against an emulation
                (Linux), so the tests run them here.
FASTCLIP_SANITIZE=1 (Linux) builds _cpu and _cuda_emu with AddressSanitizer
and UndefinedBehaviorSanitizer, for `make sanitize`: they then load only with
the sanitizers' runtimes preloaded (LD_PRELOAD), as that target runs them.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pybind11
from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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

# FASTCLIP_SANITIZE=1: every out-of-bounds access, use after free and undefined
# operation (an index that overflows, a misaligned load) stops the test that
# made it.  -fno-wrapv: Python's own flags make signed overflow wrap, which the
# CUDA kernels (the emulation's source) may not rely on.  Last on the command
# line, so -O1 wins over -O3.
sanitize = os.environ.get("FASTCLIP_SANITIZE") == "1"
if sanitize and not sys.platform.startswith("linux"):
    raise SystemExit("FASTCLIP_SANITIZE=1 is for Linux (gcc or clang)")
sanitize_flags = (
    ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
     "-fno-wrapv", "-D_GLIBCXX_ASSERTIONS", "-g", "-O1"]
    if sanitize
    else []
)  # fmt: skip
sanitize_link = ["-fsanitize=address,undefined"] if sanitize else []

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
            "csrc/common/coefficients.h",
            "csrc/common/dtypes.h",
            "csrc/common/hd.h",
            "csrc/common/norm_kind.h",
            "csrc/common/segment_table.h",
            "csrc/common/segments.h",
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
        extra_compile_args=cpu_flags + sanitize_flags,
        extra_link_args=cpu_link + sanitize_link,
    ),
]


CUDA_SOURCES = ["csrc/cuda/kernels.cu", "csrc/cuda/module.cpp"]
CUDA_DEPENDS = [
    "csrc/cuda/kernel_table.h",
    "csrc/cuda/launch.h",
    "csrc/common/coefficients.h",
    "csrc/common/dtypes.h",
    "csrc/common/hd.h",
    "csrc/common/norm_kind.h",
    "csrc/common/segments.h",
    "csrc/common/segment_table.h",
]


# fastclip._cuda_emu: the CUDA kernels and launchers compiled for the CPU against a
# CUDA emulation (csrc/cuda/emulation.h), so they are tested here without a GPU.
if sys.platform.startswith("linux"):  # the emulation's fibers use ucontext
    ext_modules.append(
        Pybind11Extension(
            "fastclip._cuda_emu",
            sources=["csrc/cuda/emulated.cpp", "csrc/cuda/module.cpp"],
            include_dirs=["csrc", "csrc/cuda"],
            depends=["csrc/cuda/kernels.cu", "csrc/cuda/emulation.h", *CUDA_DEPENDS],
            define_macros=[("FASTCLIP_CUDA_EMULATION", "1")],
            cxx_std=17,
            extra_compile_args=["-O2", "-Wno-unknown-pragmas", *sanitize_flags],
            extra_link_args=sanitize_link,
        )
    )

# ---------------------------------------------------------------- fastclip._cuda



def cuda_mode() -> str:
    mode = os.environ.get("FASTCLIP_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"FASTCLIP_CUDA={mode!r}: use 1 (build the CUDA backend), 0 (skip it) or auto")
    return mode


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None


class BuildExt(build_ext):
    """Builds fastclip._cuda with nvcc (compile both sources, link with the
    static CUDA runtime); the other extensions as usual."""

    def build_extension(self, ext):
        if ext.name != "fastclip._cuda":
            return super().build_extension(ext)
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME, or FASTCLIP_CUDA=0 to build without the CUDA backend)")
        target = self.get_ext_fullpath(ext.name)
        if not self.force and all(
            os.path.exists(target) and os.path.getmtime(src) <= os.path.getmtime(target)
            for src in CUDA_SOURCES + CUDA_DEPENDS
        ):
            return
        archs = [a.strip() for a in os.environ.get("FASTCLIP_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        common = [
            "-std=c++17", "-O3", "-Icsrc", "-Xcompiler=-fPIC,-fvisibility=hidden",
            f'-DFASTCLIP_CUDA_ARCHS="{";".join(archs)}"',
        ]  # fmt: skip
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        kernels_o, module_o = os.path.join(tmp, "kernels.o"), os.path.join(tmp, "module.o")
        jobs = [  # in parallel: the kernels take the longest
            [nvcc, "-c", CUDA_SOURCES[0], "-o", kernels_o, *common, *gencode],
            [nvcc, "-c", CUDA_SOURCES[1], "-o", module_o, *common, *includes],
        ]
        for cmd in jobs:
            print(" ".join(cmd))
        procs = [subprocess.Popen(cmd) for cmd in jobs]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("nvcc failed to compile fastclip._cuda")
        link = [nvcc, "-shared", "--cudart=static", "-o", target, kernels_o, module_o, "-Xcompiler=-fPIC"]
        print(" ".join(link))
        subprocess.check_call(link)


class OptionalCudaBuildExt(BuildExt):
    """With FASTCLIP_CUDA unset (auto), a failed CUDA build leaves fastclip
    without its CUDA backend instead of failing the install."""

    def build_extension(self, ext):
        if ext.name == "fastclip._cuda" and cuda_mode() == "auto":
            try:
                return super().build_extension(ext)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                print(f"WARNING: fastclip._cuda not built ({exc}); the 'cuda' backend will be unavailable")
                return None
        return super().build_extension(ext)


mode = cuda_mode()
if mode == "1" or (mode == "auto" and find_nvcc() is not None):
    ext_modules.append(Extension("fastclip._cuda", sources=CUDA_SOURCES, depends=CUDA_DEPENDS))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalCudaBuildExt})
