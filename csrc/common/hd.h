// FASTCLIP_HD: a function compiled for both the host and the device (nvcc),
// or a plain inline function (host compilers, the CUDA emulation), so that the
// CPU kernels, the CUDA kernels and their tests share one definition.
#pragma once

#ifdef __CUDACC__
#define FASTCLIP_HD __host__ __device__ __forceinline__
#else
#define FASTCLIP_HD inline
#endif
