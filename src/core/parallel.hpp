// Internal: a small thread pool loop shared by the CPU backend and the CLI's host work.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace tilewise::detail {

/// Threads for host work: TILEWISE_NUM_THREADS if set, else every core.
inline int num_threads() {
  if (const char* env = std::getenv("TILEWISE_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

/// Runs f(i) for i in [0, n) on a pool of threads, handing out indices dynamically; rethrows the first
/// exception after every thread has stopped.
template <class F>
void parallel_for(int64_t n, F&& f) {
  const int threads = static_cast<int>(std::min<int64_t>(num_threads(), n));
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&] {
    try {
      for (int64_t i; (i = next.fetch_add(1)) < n;) f(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = n;
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace tilewise::detail
