// A small persistent thread pool: the caller plus up to N-1 parked workers.
//
// fastclip does not use torch's pool (it must build without torch), so it
// keeps its own, sized per call from torch.get_num_threads().  Workers sleep
// on a condition variable between calls and are recreated after fork().
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace fastclip::cpu {

// Runs task(thread_index) on `nthreads` threads (index 0 is the caller) and
// returns when every call has returned.  Calls from several threads are
// serialised.
void run_on_threads(int nthreads, const std::function<void(int)>& task);

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
