// A small fork-join thread pool for the CPU backend's data-parallel kernels.
//
// parallel_for(n, fn) runs fn(task) for task in [0, n) on the pool's threads and the caller,
// and returns when all tasks are done. Workers spin briefly between jobs (a forward issues
// hundreds of short jobs back to back) and then sleep. One job at a time: the engine
// serializes forwards.
#pragma once

#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace medusa_rt {

class ThreadPool {
 public:
  // num_threads counts the calling thread: 1 means no worker threads.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }
  void parallel_for(int num_tasks, const std::function<void(int)>& fn);

 private:
  void worker_loop();
  void run_tasks(uint32_t job);

  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<int> num_tasks_{0};
  // (job << 32) | next task: a task is claimed by a compare-exchange that also checks the job, so
  // a thread still looking for work in a finished job cannot take (or skip) a task of the next.
  std::atomic<uint64_t> next_task_{0};
  std::atomic<int> done_tasks_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

// Number of cores this process may run on.
int available_cores();

}  // namespace medusa_rt
