// The norms the kernels fuse; the codes are the contract with Python, which
// reads them from the extension (fastclip._cpu.NORM_KINDS).
#pragma once

#include <cstdint>

namespace fastclip {

enum NormKind : int32_t { kL1 = 1, kL2 = 2, kLinf = 3 };

inline bool valid_norm_kind(int32_t kind) { return kind >= kL1 && kind <= kLinf; }

}  // namespace fastclip
