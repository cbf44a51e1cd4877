// fastclip._cuda_emu: kernels.cu compiled for the CPU against emulation.h (see there).
#ifndef FASTCLIP_CUDA_EMULATION
#define FASTCLIP_CUDA_EMULATION 1
#endif
#include "kernels.cu"
