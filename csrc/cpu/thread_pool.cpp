#include "thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastclip::cpu {
namespace {

class Pool {
 public:
  Pool() { pthread_atfork(nullptr, nullptr, &Pool::after_fork_in_child); }

  void run(int nthreads, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> one_job(job_mu_);
    grow(nthreads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      task_ = &task;
      participants_ = nthreads;
      pending_ = nthreads - 1;
      ++generation_;
    }
    wake_.notify_all();
    task(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void grow(int workers) {
    while (static_cast<int>(workers_->size()) < workers) {
      // generation_ only changes under job_mu_, which the caller holds: a new
      // worker starts from the current generation and so sees the next job.
      const int index = static_cast<int>(workers_->size()) + 1;
      const uint64_t seen = generation_;
      workers_->emplace_back([this, index, seen] { loop(index, seen); });
    }
  }

  void loop(int index, uint64_t seen) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      wake_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= participants_) continue;
      const std::function<void(int)>* task = task_;
      lk.unlock();
      (*task)(index);
      lk.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  // The child of fork() has only the forking thread: forget the workers (their
  // std::thread objects are leaked on purpose, destroying them would abort)
  // and start from fresh synchronisation objects.
  static void after_fork_in_child();

  std::mutex job_mu_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread>* workers_ = new std::vector<std::thread>();
  const std::function<void(int)>* task_ = nullptr;
  int participants_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
};

// Never destroyed: workers may still be parked in it when the process exits.
Pool* const g_pool = new Pool();

#ifdef _OPENMP
std::atomic<bool> g_use_openmp{true};
#else
std::atomic<bool> g_use_openmp{false};
#endif

void Pool::after_fork_in_child() {
  g_use_openmp = false;  // the parent's OpenMP threads do not exist here
  Pool* p = g_pool;
  new (&p->job_mu_) std::mutex();
  new (&p->mu_) std::mutex();
  new (&p->wake_) std::condition_variable();
  new (&p->done_) std::condition_variable();
  p->workers_ = new std::vector<std::thread>();
  p->task_ = nullptr;
  p->participants_ = 0;
  p->pending_ = 0;
}

}  // namespace

void run_on_threads(int nthreads, const std::function<void(int)>& task) {
  if (nthreads <= 1) {
    task(0);
    return;
  }
#ifdef _OPENMP
  if (g_use_openmp) {
#pragma omp parallel num_threads(nthreads)
    task(omp_get_thread_num());
    return;
  }
#endif
  g_pool->run(nthreads, task);
}

const char* threading() { return g_use_openmp ? "openmp" : "pool"; }

bool set_threading(const char* name) {
  if (std::strcmp(name, "pool") == 0) {
    g_use_openmp = false;
    return true;
  }
#ifdef _OPENMP
  if (std::strcmp(name, "openmp") == 0) {
    g_use_openmp = true;
    return true;
  }
#endif
  return false;
}

}  // namespace fastclip::cpu
