// A small persistent thread pool: parallel_for over task indices with a caller-chosen width.
// Workers persist so that a kernel call at batch 1 (every generated token, every hooked layer)
// does not pay for thread creation. One job runs at a time; a parallel_for issued from inside a
// job (or while another job runs) executes inline on the calling thread, so callers from
// several threads (e.g. llama.cpp's eval thread and a Python thread) never deadlock. The pool is
// fork-safe (a forked child creates its own) and is never torn down at exit.
#pragma once

#include <cstdint>
#include <functional>

namespace saehook {

int hardware_threads();

// The most threads one call uses (and the pool ever creates): kThreadsPerCpu x the CPUs, so a
// request like threads=1000 on 2 cores does not create 1000 threads kept for the process.
constexpr int kThreadsPerCpu = 4;
int max_threads();

// Runs fn(task, worker) for task in [0, n_tasks) on up to n_threads threads (the caller is worker
// 0). Tasks are handed out dynamically. Exceptions thrown by fn are re-thrown in the caller.
void parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t, int)> &fn);

}  // namespace saehook
