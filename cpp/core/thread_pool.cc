#include "core/thread_pool.h"

#include <sched.h>

#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MRT_PAUSE() _mm_pause()
#else
#define MRT_PAUSE() std::this_thread::yield()
#endif

namespace medusa_rt {

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_tasks(uint32_t job) {
  // acquire pairs with the release store in parallel_for: a thread that claims a task of a job
  // sees that job's fn and task count.
  uint64_t v = next_task_.load(std::memory_order_acquire);
  while (true) {
    if (uint32_t(v >> 32) != job) return;  // a later job has started (this one is done)
    const int t = static_cast<int>(uint32_t(v));
    if (t >= num_tasks_.load(std::memory_order_acquire)) return;
    if (!next_task_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    (*job_)(t);
    done_tasks_.fetch_add(1, std::memory_order_release);
    v = next_task_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  while (true) {
    // Spin for a short while: jobs of one forward come back to back.
    auto spin_start = std::chrono::steady_clock::now();
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen) {
      MRT_PAUSE();
      if (++spins == 256) {
        std::this_thread::yield();
        spins = 0;
        if (std::chrono::steady_clock::now() - spin_start > std::chrono::microseconds(200)) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1);
          break;
        }
      }
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    run_tasks(static_cast<uint32_t>(seen));
  }
}

void ThreadPool::parallel_for(int num_tasks, const std::function<void(int)>& fn) {
  if (num_tasks <= 0) return;
  if (workers_.empty() || num_tasks == 1) {
    for (int t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  const uint64_t gen = generation_.load(std::memory_order_relaxed) + 1;
  const uint64_t tag = uint64_t(uint32_t(gen)) << 32;
  // Close the previous job's counter before its task count changes: a thread still looking for
  // work there (there is none left) reads either the old count or, after this store, the new one,
  // and its claim then fails on the new tag.
  next_task_.store(tag | 0x7fffffffu, std::memory_order_seq_cst);
  job_ = &fn;
  num_tasks_.store(num_tasks, std::memory_order_release);
  done_tasks_.store(0, std::memory_order_relaxed);
  next_task_.store(tag, std::memory_order_release);
  if (sleepers_.load() > 0) {
    { std::lock_guard<std::mutex> lock(mu_); generation_.store(gen, std::memory_order_release); }
    cv_.notify_all();
  } else {
    generation_.store(gen, std::memory_order_release);
  }
  run_tasks(static_cast<uint32_t>(gen));
  // Wait for the workers; yield now and then so that a worker sharing this core (an
  // oversubscribed machine) gets to run.
  for (int spins = 0; done_tasks_.load(std::memory_order_acquire) < num_tasks; ++spins) {
    MRT_PAUSE();
    if (spins > 1024 && (spins & 63) == 0) std::this_thread::yield();
  }
}

}  // namespace medusa_rt
