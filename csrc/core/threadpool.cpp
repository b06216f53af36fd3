#include "threadpool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

namespace saehook {

// Asked once: glibc's hardware_concurrency reads /sys/devices/system/cpu/online on every call,
// which cost about 20 us per kernel call on the 2-core Zen 5 VM (decode at batch 1, k 1: 30 ->
// 9 us; every call resolves its thread count through here).
int hardware_threads() {
  static const int n = [] {
    unsigned c = std::thread::hardware_concurrency();
    return c == 0 ? 1 : int(c);
  }();
  return n;
}

int max_threads() { return kThreadsPerCpu * hardware_threads(); }

namespace {

// The pool is never destroyed: at process exit its workers may still be serving a call from a
// thread the exit did not stop (a Python daemon thread), and destroying a std::thread that runs
// calls std::terminate. The operating system ends the workers with the process.
class Pool {
 public:
  void run(int64_t n_tasks, int n_threads, const std::function<void(int64_t, int)> &fn) {
    std::unique_lock<std::mutex> job(job_mu_, std::try_to_lock);
    if (!job.owns_lock() || in_job_) {  // busy or nested: run inline
      for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
      return;
    }
    int width = int(std::min<int64_t>(n_threads, n_tasks));
    if (width <= 1) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
      return;
    }
    ensure_workers(width - 1);
    std::exception_ptr error;
    std::mutex error_mu;
    std::atomic<int64_t> next{0};
    std::function<void(int)> body = [&](int worker) {
      try {
        for (int64_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1)) fn(t, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_mu);
        if (!error) error = std::current_exception();
        next.store(n_tasks);
      }
    };
    {
      std::lock_guard<std::mutex> lk(mu_);
      body_ = &body;
      active_ = width - 1;
      pending_ = width - 1;
      ++generation_;
    }
    cv_.notify_all();
    in_job_ = true;
    body(0);
    {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return pending_ == 0; });
      body_ = nullptr;
    }
    in_job_ = false;
    if (error) std::rethrow_exception(error);
  }

 private:
  void ensure_workers(int n) {
    while (int(workers_.size()) < n) {
      int id = int(workers_.size()) + 1;
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)> *body = nullptr;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (id > active_) continue;  // not part of this job
        body = body_;
      }
      (*body)(id);
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (--pending_ == 0) done_cv_.notify_one();
      }
    }
  }

  std::mutex job_mu_;  // one job at a time
  bool in_job_ = false;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)> *body_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
};

// Fork safety: a forked child has only the forking thread, so the parent's workers do not exist
// there and its pool's locks may be held forever. The child abandons that pool (leaked: its
// std::thread objects must not be destroyed) and creates a new one on its next parallel call.
std::mutex g_pool_mu;
Pool *g_pool = nullptr;

void before_fork() { g_pool_mu.lock(); }
void after_fork_parent() { g_pool_mu.unlock(); }
void after_fork_child() {
  g_pool_mu.unlock();
  g_pool = nullptr;
}

Pool &pool() {
  static const bool registered = [] {
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) g_pool = new Pool();
  return *g_pool;
}

thread_local bool tls_inside_job = false;

}  // namespace

void parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t, int)> &fn) {
  if (n_tasks <= 0) return;
  n_threads = std::min(n_threads, max_threads());
  if (tls_inside_job || n_threads <= 1 || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return;
  }
  // Mark workers and caller as inside a job so nested calls run inline.
  auto wrapped = [&](int64_t t, int w) {
    bool prev = tls_inside_job;
    tls_inside_job = true;
    try {
      fn(t, w);
    } catch (...) {
      tls_inside_job = prev;
      throw;
    }
    tls_inside_job = prev;
  };
  pool().run(n_tasks, n_threads, wrapped);
}

}  // namespace saehook
