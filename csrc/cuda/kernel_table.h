// The CUDA backend's table of work, passed to every kernel by value as a
// kernel parameter: no device allocation, no host-to-device copy, nothing to
// keep alive for CUDA-graph replay (a graph keeps its nodes' parameters).
//
// It holds the rows of the GPU backends' unit table (csrc/common/unit_table.h:
// one row per dense, non-empty grad; the grads viewed as one concatenation,
// cut into units of kUnitElems elements that never span two grads).  A launch
// takes at most CAP rows; a longer table is cut into chunks of rows, one set
// of launches each, with units numbered from 0 in every chunk.
//
// This header is plain C++ as well as CUDA, so the host can test the packing
// and the search that the kernels run (fastclip._cuda exposes both).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../common/hd.h"


namespace fastclip::cuda {

// A work unit: 32 KB of bf16/fp16, 64 KB of fp32, 128 KB of fp64.  Each
// thread of a 256-thread block then moves 8, 16 or 32 16-byte vectors per unit.
constexpr int64_t kUnitElems = 16384;
constexpr int kThreads = 256;

// Rows per launch.  Kernel parameters may take 4 KB everywhere and 32 KB with
// CUDA >= 12.1 on Volta and newer; the rest of a kernel's parameters need
// < 200 bytes.  A table of at most kSmallRows rows uses the 4 KB kernels
// (less to copy per launch), a longer one the 32 KB kernels.
constexpr int kSmallRows = 190;
constexpr int kLargeRows = 1600;

template <int CAP>
struct KernelTable {
  uint64_t address[CAP];
  int64_t numel_code[CAP];  // element count << 8 | dtype code (csrc/common/dtypes.h)
  int32_t first_unit[CAP];  // of each row, counted from the chunk's first row
  int32_t rows;
  int32_t units;

  FASTCLIP_HD int64_t numel(int r) const { return numel_code[r] >> 8; }
  FASTCLIP_HD int code(int r) const { return static_cast<int>(numel_code[r] & 0xff); }

  // The row holding unit u (0 <= u < units): the last row whose first unit is
  // <= u.  Rows never have zero units, so first units strictly increase.
  FASTCLIP_HD int locate(int32_t u) const {
    int lo = 0, hi = rows;  // first_unit[lo] <= u < first_unit[hi] (hi == rows: past the end)
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (first_unit[mid] <= u) lo = mid; else hi = mid;
    }
    return lo;
  }
};

static_assert(sizeof(KernelTable<kSmallRows>) <= 4096 - 256, "small table must leave room in 4 KB of parameters");
static_assert(sizeof(KernelTable<kLargeRows>) <= 32764 - 256, "large table must leave room in 32 KB of parameters");

// The unit table's four int64 columns, as csrc/common/unit_table.h lays them out.
struct UnitColumns {
  const int64_t* first_unit;
  const int64_t* address;
  const int64_t* numel;
  const int64_t* code;
  int64_t rows;

  static UnitColumns of(const void* bytes, size_t size, int64_t rows) {
    if (rows < 0 || size != static_cast<size_t>(rows) * 4 * sizeof(int64_t))
      throw std::invalid_argument("unit table: its size does not match 4 int64 columns of `rows` entries");
    const int64_t* p = static_cast<const int64_t*>(bytes);
    return {p, p + rows, p + 2 * rows, p + 3 * rows, rows};
  }
};

// Checks every row (the kernels trust the table): positive element counts
// below 2^55, known dtype codes, and first units made with kUnitElems.
inline void validate(const UnitColumns& c, int64_t total_units) {
  for (int64_t i = 0; i < c.rows; ++i) {
    if (c.numel[i] <= 0 || c.numel[i] >= (int64_t{1} << 55) || c.code[i] < 0 || c.code[i] > 3)
      throw std::invalid_argument("unit table: a row with an invalid element count or dtype code");
    const int64_t next = i + 1 < c.rows ? c.first_unit[i + 1] : total_units;
    if (next - c.first_unit[i] != (c.numel[i] + kUnitElems - 1) / kUnitElems || (i == 0 && c.first_unit[0] != 0))
      throw std::invalid_argument("unit table: its units were not counted in units of kUnitElems elements");
  }
}

// Rows [begin, end) of a table cut for launches of at most `cap` rows.
struct Chunk {
  int64_t begin, end;
  int64_t units;
};

inline std::vector<Chunk> chunks_of(const UnitColumns& c, int64_t total_units, int cap) {
  std::vector<Chunk> out;
  for (int64_t b = 0; b < c.rows; b += cap) {
    const int64_t e = b + cap < c.rows ? b + cap : c.rows;
    const int64_t units = (e < c.rows ? c.first_unit[e] : total_units) - c.first_unit[b];
    if (units > INT32_MAX) throw std::invalid_argument("unit table: more than 2^31 units in one launch");
    out.push_back({b, e, units});
  }
  return out;
}

template <int CAP>
void fill(KernelTable<CAP>& t, const UnitColumns& c, const Chunk& chunk) {
  const int64_t base = c.first_unit[chunk.begin];
  int r = 0;
  for (int64_t i = chunk.begin; i < chunk.end; ++i, ++r) {
    t.address[r] = static_cast<uint64_t>(c.address[i]);
    t.numel_code[r] = c.numel[i] << 8 | c.code[i];
    t.first_unit[r] = static_cast<int32_t>(c.first_unit[i] - base);
  }
  t.rows = r;
  t.units = static_cast<int32_t>(chunk.units);
}

}  // namespace fastclip::cuda
