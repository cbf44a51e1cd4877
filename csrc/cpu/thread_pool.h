// Running work on several threads, sized per call from torch.get_num_threads().
//
// Where the build has OpenMP, parallel regions run on the OpenMP runtime
// already loaded in the process: with GCC that is torch's own libgomp (same
// soname), so fastclip uses torch's warm intra-op threads instead of
// competing with them while they spin after torch's last parallel op.  In a
// forked child (libgomp is not fork-safe), in builds without OpenMP, or when
// asked, a small persistent pool of fastclip's own does the work.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace fastclip::cpu {

// Runs task(thread_index) on up to `nthreads` threads (index 0 is the
// caller) and returns when every call has returned.  The task must not assume
// how many threads run it.
void run_on_threads(int nthreads, const std::function<void(int)>& task);

// "openmp" or "pool"; set_threading returns false for a name not available.
const char* threading();
bool set_threading(const char* name);

// Calls body(item) for every item in [0, count), handing out blocks of items
// dynamically so that threads that finish early take more.  With `reverse`
// the items are handed out from the last to the first.
template <class Body>
void parallel_items(int64_t count, int nthreads, bool reverse, const Body& body) {
  if (count <= 0) return;
  if (nthreads <= 1 || count == 1) {
    for (int64_t k = 0; k < count; ++k) body(reverse ? count - 1 - k : k);
    return;
  }
  if (nthreads > count) nthreads = static_cast<int>(count);
  const int64_t block = count / (static_cast<int64_t>(nthreads) * 16) + 1;
  std::atomic<int64_t> next{0};
  run_on_threads(nthreads, [&](int) {
    for (;;) {
      const int64_t start = next.fetch_add(block, std::memory_order_relaxed);
      if (start >= count) break;
      const int64_t stop = start + block < count ? start + block : count;
      for (int64_t k = start; k < stop; ++k) body(reverse ? count - 1 - k : k);
    }
  });
}

}  // namespace fastclip::cpu
