// Instantiates row_kernels_impl.h once per instruction set and picks one at
// run time (FASTCLIP_CPU_ISA, read by the Python side, may force another).
#include "row_kernels.h"

#include "../common/accumulate.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTCLIP_X86 1
#else
#define FASTCLIP_X86 0
#endif

namespace fastclip::cpu {

// Portable build: SSE2 on x86-64, the compiler's default elsewhere.
namespace baseline {
#define FASTCLIP_AVX2 0
#include "row_kernels_impl.h"
#undef FASTCLIP_AVX2
}  // namespace baseline

#if FASTCLIP_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
#define FASTCLIP_AVX2 1
#include "row_kernels_impl.h"
#undef FASTCLIP_AVX2
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {

struct Isa {
  const char* name;
  RowKernels (*make)(const char*);
  bool (*supported)();
};

bool always() { return true; }
#if FASTCLIP_X86
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

// Widest first.
const Isa kIsas[] = {
#if FASTCLIP_X86
    {"avx2", avx2::make_table, has_avx2},
#endif
    {"baseline", baseline::make_table, always},
};

RowKernels pick(const char* wanted) {
  for (const Isa& isa : kIsas) {
    if ((wanted == nullptr || std::strcmp(wanted, isa.name) == 0) && isa.supported()) return isa.make(isa.name);
  }
  return baseline::make_table("baseline");
}

RowKernels g_active = pick(nullptr);

}  // namespace

const RowKernels& row_kernels() { return g_active; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const Isa& isa : kIsas)
    if (isa.supported()) out.emplace_back(isa.name);
  return out;
}

bool select_isa(const std::string& name) {
  for (const Isa& isa : kIsas) {
    if (name == isa.name && isa.supported()) {
      g_active = isa.make(isa.name);
      return true;
    }
  }
  return false;
}

}  // namespace fastclip::cpu
