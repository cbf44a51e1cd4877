// A CPU emulation of the part of CUDA that kernels.cu uses, so that the same
// kernels (and their host-side launchers) compile with the host C++ compiler
// into fastclip._cuda_emu and run on CPU memory: this is how the CUDA
// backend's kernels are tested against torch on a machine without a GPU
// (as Triton's interpreter does for the Triton backend).
//
// Every CUDA thread is a fiber (ucontext) on the calling OS thread.  Blocks
// run one at a time, their threads round-robin between barriers:
// __syncthreads, warp shuffles (lanes exchange through a buffer between two
// warp barriers) and, in cooperative launches only, the grid barrier, where
// every block waits before any goes on.  Memory is the process's own, so
// there are no races to model.  It checks what it can: a grid barrier in a
// launch that is not cooperative, and a deadlocked barrier, raise errors.
// Float conversions are the exact host ones of csrc/common/dtypes.h.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtypes.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // blocks never interleave between grid barriers (see above)
#define __grid_constant__
#define __launch_bounds__(...)

namespace fastclip::cuda::emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// The emulated device: a few SMs, so that blocks take several units each.
constexpr int kSms = 2;
constexpr int kBlocksPerSm = 2;
constexpr int kWarp = 32;

class GridRun;
GridRun*& current_run();

class GridRun {
 public:
  GridRun(int grid, int threads, bool cooperative) : grid_(grid), threads_(threads), cooperative_(cooperative) {
    fibers_.resize(static_cast<size_t>(grid) * threads);
    warp_buffer_.resize(threads);
    for (int b = 0; b < grid; ++b) blocks_.push_back({threads, 0, 0});
    for (int w = 0; w < grid * ((threads + kWarp - 1) / kWarp); ++w) warps_.push_back({kWarp, 0, 0});
  }

  // Runs body() as every thread of the grid.
  void run(const std::function<void()>& body) {
    body_ = &body;
    GridRun* outer = current_run();
    current_run() = this;
    struct Restore {
      GridRun* outer;
      ~Restore() { current_run() = outer; }
    } restore{outer};
    for (int phase = 0;; ++phase) {
      for (int b = 0; b < grid_; ++b) run_block(b);
      if (!error_.empty()) throw std::runtime_error(error_);
      if (grid_waiting_ == 0) break;  // every thread returned
      if (grid_waiting_ != grid_alive()) throw std::runtime_error("emulated CUDA: threads returned during grid.sync()");
      grid_waiting_ = 0;
      ++grid_generation_;
    }
  }

  Dim3 thread_idx() const { return {static_cast<unsigned>(current_ % threads_), 0, 0}; }
  Dim3 block_idx() const { return {static_cast<unsigned>(current_ / threads_), 0, 0}; }
  Dim3 grid_dim() const { return {static_cast<unsigned>(grid_), 0, 0}; }
  Dim3 block_dim() const { return {static_cast<unsigned>(threads_), 0, 0}; }

  void sync_block() { arrive(blocks_[current_ / threads_]); }
  void sync_warp() { arrive(warps_[warp_of(current_)]); }

  void sync_grid() {
    if (!cooperative_) fail("grid.sync() in a launch that is not cooperative");
    Fiber& f = fibers_[current_];
    f.grid_generation = grid_generation_;
    ++grid_waiting_;
    ++progress_;
    f.waiting_grid = true;
    while (grid_generation_ == f.grid_generation) yield();
    f.waiting_grid = false;
  }

  template <class T>
  T shfl_down(T v, unsigned offset) {
    static_assert(sizeof(T) <= sizeof(double), "shuffle of at most 8 bytes");
    const int lane = current_ % threads_ % kWarp;
    const int base = current_ % threads_ - lane;
    std::memcpy(&warp_buffer_[base + lane], &v, sizeof(T));
    sync_warp();
    T out = v;
    if (lane + offset < static_cast<unsigned>(kWarp)) std::memcpy(&out, &warp_buffer_[base + lane + offset], sizeof(T));
    sync_warp();
    return out;
  }

 private:
  struct Barrier {
    int alive;
    int arrived;
    unsigned generation;
  };
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    bool started = false, done = false, waiting_grid = false;
    unsigned grid_generation = 0;  // the grid barrier it waits at
  };

  static constexpr size_t kStack = 256 * 1024;  // a 32 KB table is a by-value parameter

  int warp_of(int fiber) const { return fiber / threads_ * ((threads_ + kWarp - 1) / kWarp) + fiber % threads_ / kWarp; }

  int grid_alive() const {
    int n = 0;
    for (const Fiber& f : fibers_) n += !f.done;
    return n;
  }

  void arrive(Barrier& b) {
    const unsigned generation = b.generation;
    ++progress_;
    if (++b.arrived == b.alive) {
      b.arrived = 0;
      ++b.generation;
      return;
    }
    while (b.generation == generation) yield();
  }

  void leave(Barrier& b) {  // a returning thread no longer counts at its barriers
    ++progress_;
    if (--b.alive > 0 && b.arrived == b.alive) {
      b.arrived = 0;
      ++b.generation;
    }
  }

  void yield() {
    Fiber& f = fibers_[current_];
    swapcontext(&f.context, &scheduler_);
  }

  [[noreturn]] void fail(const std::string& what) {
    error_ = "emulated CUDA: " + what;
    throw std::runtime_error(error_);
  }

  static void entry() {
    GridRun* run = current_run();
    try {
      (*run->body_)();
    } catch (const std::exception& e) {
      if (run->error_.empty()) run->error_ = e.what();
    }
    Fiber& f = run->fibers_[run->current_];
    f.done = true;
    run->leave(run->blocks_[run->current_ / run->threads_]);
    run->leave(run->warps_[run->warp_of(run->current_)]);
    setcontext(&run->scheduler_);
  }

  __attribute__((noinline)) static void start(Fiber& f) {
    f.started = true;
    f.stack.reset(new char[kStack]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStack;
    f.context.uc_link = nullptr;
    makecontext(&f.context, &GridRun::entry, 0);
  }

  // Runs block b's threads until each has returned or waits at the grid barrier.
  void run_block(int b) {
    for (;;) {
      bool pending = false;
      const uint64_t before = progress_;
      for (int t = 0; t < threads_; ++t) {
        const int i = b * threads_ + t;
        Fiber& f = fibers_[i];
        if (f.done || (f.waiting_grid && f.grid_generation == grid_generation_)) continue;
        pending = true;
        if (!f.started) ++progress_;
        current_ = i;
        if (!f.started) start(f);
        swapcontext(&scheduler_, &f.context);
        if (!error_.empty()) return;
      }
      if (!pending) return;
      if (progress_ == before) {  // every thread waits at a barrier that cannot open
        error_ = "emulated CUDA: deadlock: threads of block " + std::to_string(b) + " wait at different barriers";
        return;
      }
    }
  }

  int grid_, threads_;
  bool cooperative_;
  std::vector<Fiber> fibers_;
  std::vector<Barrier> blocks_, warps_;
  std::vector<double> warp_buffer_;  // one slot per thread of the running block
  unsigned grid_generation_ = 0;
  int grid_waiting_ = 0;
  int current_ = 0;
  uint64_t progress_ = 0;  // barrier arrivals, returns and starts: no change in a pass means deadlock
  ucontext_t scheduler_;
  const std::function<void()>* body_ = nullptr;
  std::string error_;
};

inline GridRun*& current_run() {
  static GridRun* run = nullptr;
  return run;
}

}  // namespace fastclip::cuda::emu

// ---- the CUDA device API used by kernels.cu

#define threadIdx (::fastclip::cuda::emu::current_run()->thread_idx())
#define blockIdx (::fastclip::cuda::emu::current_run()->block_idx())
#define gridDim (::fastclip::cuda::emu::current_run()->grid_dim())
#define blockDim (::fastclip::cuda::emu::current_run()->block_dim())

inline void __syncthreads() { ::fastclip::cuda::emu::current_run()->sync_block(); }
inline void __threadfence() {}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned offset) {
  return ::fastclip::cuda::emu::current_run()->shfl_down(v, offset);
}
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T __ldcg(const T* p) {
  return *p;
}

// nvcc's address-space hint: every emulated grad is host memory standing in for global memory.
inline bool __isGlobal(const void*) { return true; }
#define __builtin_assume(condition) static_cast<void>(condition)

struct __half {
  unsigned short bits;
};
inline __half __ushort_as_half(unsigned short s) { return {s}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return ::fastclip::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {::fastclip::float_to_half(f)}; }
struct __nv_bfloat16 {
  unsigned short bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {::fastclip::float_to_bf16(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline float __uint_as_float(unsigned u) { return ::fastclip::bits_float(u); }
using std::fma;
using std::sqrt;

namespace cooperative_groups {
struct grid_group {
  void sync() { ::fastclip::cuda::emu::current_run()->sync_grid(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// ---- the CUDA runtime API used by kernels.cu's host side

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorNotSupported = 801,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
using cudaStream_t = void*;
enum cudaDeviceAttr { cudaDevAttrCooperativeLaunch = 95 };
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
};
struct cudaFuncAttributes {
  int numRegs;
};
#define CUDART_VERSION 0
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorInvalidValue"; }
inline const char* cudaGetErrorString(cudaError_t) { return "invalid argument (emulated)"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;  // no CUDA runtime
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;  // as a recent driver: 32 KB kernel parameters
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  std::strcpy(p->name, "fastclip CUDA emulator (CPU)");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = ::fastclip::cuda::emu::kSms;
  return cudaSetDevice(device);
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = 1;
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, Kernel, int, size_t) {
  *n = ::fastclip::cuda::emu::kBlocksPerSm;
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, Kernel) {
  a->numRegs = 0;
  return cudaSuccess;
}
