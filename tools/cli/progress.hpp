// Progress for long CPU runs. A plan's run() is one library call with no callback, so the CLI estimates how
// long a run takes from a short probe run of a small problem (the CPU backend's FLOP rate for this head dim and
// dtype) and, while the runs go on, a watcher thread prints the elapsed time and that estimate on stderr;
// each finished run replaces the probe's estimate with the measured time. Quick runs print nothing.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "device.hpp"
#include "tilewise/tilewise.hpp"

namespace tilewise::cli {

/// Runs estimated to take less than this many seconds in all get no progress line.
inline constexpr double kProgressAfterSeconds = 5.0;

/// FLOP/s of the CPU backend for p's head dim and dtype: the best of two dense runs of a small problem
/// (8x16x16 latent, a few heads; ~0.1 s).
inline double cpu_flop_rate(const Problem& p) {
  Problem small;
  small.q_heads = small.kv_heads = std::min<int64_t>(p.q_heads, 4);
  small.head_dim = p.head_dim;
  small.dtype = p.dtype;
  small.latent = {8, 16, 16};
  small.tile = {2, 4, 4};
  const Plan plan(small, Pattern::dense(), Device::cpu);
  const int64_t elems = plan.problem().seq_len * small.q_heads * small.head_dim;
  std::vector<std::byte> q(elems * dtype_size(small.dtype)), o(q.size());  // zeros: the time does not depend on it
  const std::vector<int32_t> text_len(1, 0);
  double best = 1e300;
  for (int i = 0; i < 2; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    plan.run({q.data(), q.data(), q.data(), o.data(), nullptr, text_len.data()});
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return plan.flops(text_len.data()) / std::max(best, 1e-9);
}

inline std::string minutes(double seconds) {
  const long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

/// "  <what>: run 1 of 3, 2:00 elapsed of about 12:00" on stderr while `runs` runs of about `seconds_per_run`
/// each go on: redrawn every second on a terminal, a line every 30 s otherwise. finished_run() after each run.
class Progress {
 public:
  /// show: print even when the runs are expected to be quick (--progress always).
  Progress(std::string what, int64_t runs, double seconds_per_run, bool show = false)
      : what_(std::move(what)), runs_(runs), per_run_(seconds_per_run), start_(Clock::now()) {
    if (!show && runs_ * per_run_ < kProgressAfterSeconds) return;
    tty_ = isatty(fileno(stderr)) != 0;
    watcher_ = std::thread([this] { watch(); });
  }
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  ~Progress() {
    if (!watcher_.joinable()) return;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    watcher_.join();
    std::fprintf(stderr, "%s  %s: %lld run%s done in %s\n", tty_ ? "\r\033[K" : "", what_.c_str(), (long long)done_,
                 done_ == 1 ? "" : "s", minutes(elapsed()).c_str());
  }

  void finished_run() {
    const std::lock_guard<std::mutex> lock(mutex_);
    ++done_;
    per_run_ = elapsed() / done_;  // measured: better than the probe's estimate
  }

 private:
  using Clock = std::chrono::steady_clock;

  double elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

  void watch() {
    std::unique_lock<std::mutex> lock(mutex_);
    const auto period = tty_ ? std::chrono::seconds(1) : std::chrono::seconds(30);
    do {
      const double total = std::max(runs_ * per_run_, elapsed());
      std::fprintf(stderr, "%s  %s: run %lld of %lld, %s elapsed of about %s%s", tty_ ? "\r\033[K" : "",
                   what_.c_str(), (long long)std::min(done_ + 1, runs_), (long long)runs_, minutes(elapsed()).c_str(),
                   minutes(total).c_str(), tty_ ? "" : "\n");
      std::fflush(stderr);
    } while (!wake_.wait_for(lock, period, [this] { return stop_; }));
  }

  std::string what_;
  int64_t runs_;
  double per_run_;
  Clock::time_point start_;
  bool tty_ = false;
  int64_t done_ = 0;
  bool stop_ = false;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::thread watcher_;
};

}  // namespace tilewise::cli
