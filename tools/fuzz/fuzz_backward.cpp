// tilewise_fuzz: random problems, forward and backward on a GPU backend, judged against the CPU reference.
//
// Each problem draws a pattern kind (sliding tile with per-head windows, even ones and ones larger than the grid;
// attention tile with random g and r; dense; random block lists), a small latent (1..12 per axis), a tile (1..8 per
// axis, partial tiles included), text none/first/last with per-batch valid lengths (or no text_len), GQA, bf16/f16,
// head dim 64/96/128, bshd/bhsd/fused padded views, raster or tiled order (when the tile divides the latent), a
// custom scale sometimes, a head offset sometimes, and dlse or none. It runs forward + backward on the device
// (outputs poisoned with NaN first), the CPU reference on the same 16-bit inputs and in float64 on them upcast, and
// applies gradcheck::judge (the spec's accuracy rule) and the structural checks (every element written, nothing
// outside the views, keys no query sees have zero dk and dv) to o, lse, dq, dk and dv.
//
// Prints one line per failure and a summary table; exit code 1 on any failure (or when nothing could be checked).
// Usage: tilewise_fuzz [--problems N] [--seed S] [--replay PROBLEM_SEED] [--device cuda|cuda_reference|cpu]
//                      [--max-seconds T] [--verbose]
// The CPU reference is multithreaded (TILEWISE_NUM_THREADS, default every core).
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "grad_harness.hpp"
#include "oracle_case.hpp"
#include "tilewise/tilewise.hpp"

namespace {

using gradcheck::Inputs;
using gradcheck::Outputs;
using oracle::uniform;
using tilewise::Device;
using tilewise::DType;

struct Options {
  int64_t problems = 1000;
  uint64_t seed = 0;  // 0: a fresh one
  std::optional<uint64_t> replay;  // run only the problem with this problem seed
  Device device = Device::cuda;
  double max_seconds = 0;  // 0: no limit
  bool verbose = false;
};

[[noreturn]] void usage(const std::string& error) {
  std::cerr << "tilewise_fuzz: " << error << "\n"
            << "usage: tilewise_fuzz [--problems N] [--seed S] [--replay PROBLEM_SEED] "
               "[--device cuda|cuda_reference|cpu] [--max-seconds T] [--verbose]\n";
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(flag + " needs a value");
      return argv[++i];
    };
    auto number = [&](const std::string& s) -> uint64_t {
      char* end = nullptr;
      const uint64_t x = std::strtoull(s.c_str(), &end, 10);
      if (s.empty() || *end != '\0') usage("invalid " + flag + " = " + s + ": expected a non-negative integer");
      return x;
    };
    if (flag == "--problems") {
      o.problems = static_cast<int64_t>(number(value()));
    } else if (flag == "--seed") {
      o.seed = number(value());
    } else if (flag == "--replay") {
      o.replay = number(value());
    } else if (flag == "--max-seconds") {
      o.max_seconds = static_cast<double>(number(value()));
    } else if (flag == "--device") {
      const std::string d = value();
      if (d == "cuda") o.device = Device::cuda;
      else if (d == "cuda_reference" || d == "cuda-reference") o.device = Device::cuda_reference;
      else if (d == "cpu") o.device = Device::cpu;  // a self-test of the harness: the CPU against itself
      else usage("invalid --device = " + d + ": expected cuda, cuda_reference or cpu");
    } else if (flag == "--verbose") {
      o.verbose = true;
    } else {
      usage("unknown argument " + flag);
    }
  }
  if (o.seed == 0) o.seed = oracle::fresh_seed();
  return o;
}

/// The seed of problem i of a run (splitmix64 of the run seed and i), printed with failures for --replay.
uint64_t problem_seed(uint64_t run_seed, int64_t i) {
  uint64_t z = run_seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct FuzzProblem {
  oracle::Case c;
  bool dlse = false;
};

// Size limits keep one problem's two CPU reference runs (and the pair-by-pair mask checks) to milliseconds.
constexpr int64_t kMaxVideoTokens = 1000;
constexpr int64_t kMaxTiles = 64;           // block-list tables and the oracle's per-pair lookups stay small
constexpr double kMaxPairs = 2.5e6;         // batch * q_heads * S^2

/// Fraction of (batch, head, query) rows that see exactly one key: with a single key, dS = P (dP - D) is rounding
/// noise around an exact zero and a relative error means nothing, so such problems get a dlse (dS = dlse there).
double single_key_fraction(const oracle::Case& c) {
  const oracle::Problem p = oracle::to_oracle(c);
  const oracle::Mask mask(p);
  const int64_t S = p.seq_len();
  int64_t single = 0;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < S; ++i) {
        int64_t keys = 0;
        for (int64_t j = 0; j < S && keys < 2; ++j) keys += mask.allowed(b, h, i, j);
        single += keys == 1;
      }
  return double(single) / double(p.B * p.Hq * S);
}

FuzzProblem random_problem(uint64_t seed) {
  oracle::Rng rng(seed);
  FuzzProblem f;
  oracle::Case& c = f.c;
  c.kind = static_cast<oracle::Kind>(uniform(rng, 0, 3));
  c.dtype = uniform(rng, 0, 1) ? DType::bf16 : DType::f16;
  c.head_dim = std::array<int64_t, 3>{64, 96, 128}[uniform(rng, 0, 2)];
  static constexpr int64_t head_sets[][2] = {{1, 1}, {2, 1}, {2, 2}, {3, 1}, {3, 3}, {4, 1}, {4, 2}, {4, 4}};
  const auto& hs = head_sets[uniform(rng, 0, 7)];
  c.q_heads = hs[0], c.kv_heads = hs[1];
  c.batch = uniform(rng, 1, 2);
  const bool text = uniform(rng, 0, 2) > 0;
  c.text = text ? uniform(rng, 1, 40) : 0;
  c.text_first = text && uniform(rng, 0, 1);
  // Latent and tile: a quarter of the problems have a tile that divides the latent (tiled order is defined there).
  const bool divisible = uniform(rng, 0, 3) == 0;
  for (;;) {
    for (int a = 0; a < 3; ++a) {
      int64_t& tile = a == 0 ? c.tile.t : a == 1 ? c.tile.h : c.tile.w;
      int64_t& extent = a == 0 ? c.latent.t : a == 1 ? c.latent.h : c.latent.w;
      tile = uniform(rng, 1, 8);
      extent = divisible ? tile * uniform(rng, 1, 12 / tile) : uniform(rng, 1, 12);
    }
    const double S = double(c.latent.volume() + c.text);
    if (c.latent.volume() <= kMaxVideoTokens && c.num_tiles() <= kMaxTiles &&
        double(c.batch) * c.q_heads * S * S <= kMaxPairs)
      break;
  }
  c.tiled = c.latent.t % c.tile.t == 0 && c.latent.h % c.tile.h == 0 && c.latent.w % c.tile.w == 0 &&
            uniform(rng, 0, 1);
  if (text && uniform(rng, 0, 2) > 0)
    for (int64_t b = 0; b < c.batch; ++b) {
      const int64_t pick = uniform(rng, 0, 2);
      c.text_len.push_back(static_cast<int32_t>(pick == 0 ? 0 : pick == 1 ? c.text : uniform(rng, 0, c.text)));
    }
  c.storage = static_cast<oracle::StorageKind>(uniform(rng, 0, 2));
  if (uniform(rng, 0, 2) == 0) c.scale = 0.02 + 0.23 * std::uniform_real_distribution<double>(0, 1)(rng);
  // Pattern table: one entry for all heads, or one per global head (sometimes with a sequence-parallel offset).
  const bool per_head = uniform(rng, 0, 1);
  if (per_head && uniform(rng, 0, 3) == 0) c.head_offset = c.q_heads * uniform(rng, 1, 2);
  const int64_t table = per_head ? c.head_offset + c.q_heads * (1 + (c.head_offset > 0)) : 1;
  c.heads.clear();
  for (int64_t i = 0; i < table; ++i) {
    oracle::HeadPattern h;
    h.kt = uniform(rng, 1, c.tiles(0) + 2);  // up to 2 past the grid: windows larger than the grid
    h.kh = uniform(rng, 1, c.tiles(1) + 2);
    h.kw = uniform(rng, 1, c.tiles(2) + 2);
    h.global_frames = uniform(rng, 0, 3) == 0 ? 0 : uniform(rng, 0, c.latent.t + 1);
    h.radius = uniform(rng, 0, 3);
    c.heads.push_back(h);
  }
  if (c.kind == oracle::Kind::block_list) c.blocks = oracle::random_blocks(rng, table, c.num_tiles());
  f.dlse = uniform(rng, 0, 1);
  if (!f.dlse && single_key_fraction(c) > 0.5) f.dlse = true;
  return f;
}

std::string describe(const FuzzProblem& f) { return oracle::describe(f.c) + (f.dlse ? " dlse" : " no-dlse"); }

/// The worst error seen for one tensor, and where.
struct Worst {
  double err = -1, bound = 0, err_vs_half = 0;
  uint64_t seed = 0;
  std::string problem;
};

std::string fmt(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", x);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  if (opt.device != Device::cpu && !tilewise::cuda_available()) {
    std::cerr << "tilewise_fuzz: no CUDA device (or built without CUDA); --device cpu runs the harness self-test\n";
    return 1;
  }
  std::vector<uint64_t> seeds;
  if (opt.replay)
    seeds.push_back(*opt.replay);
  else
    for (int64_t i = 0; i < opt.problems; ++i) seeds.push_back(problem_seed(opt.seed, i));
  std::cout << "tilewise_fuzz: " << seeds.size() << " problems on " << tilewise::to_string(opt.device) << ", seed "
            << opt.seed << (opt.replay ? " (replaying one problem)" : "") << std::endl;

  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  std::array<Worst, gradcheck::kNumTensors> worst;
  std::map<std::string, int64_t> skipped;  // reason -> count
  int64_t checked = 0, failed = 0, run = 0;
  // Where the time goes: problem generation, device runs, the two CPU reference runs, the checks.
  double t_generate = 0, t_device = 0, t_reference = 0, t_checks = 0;
  auto timed = [&](double& total, auto&& f) {
    const double t0 = elapsed();
    f();
    total += elapsed() - t0;
  };
  bool context_lost = false, out_of_time = false;

  for (size_t n = 0; n < seeds.size(); ++n) {
    if (opt.max_seconds > 0 && elapsed() > opt.max_seconds) {
      out_of_time = true;
      break;
    }
    ++run;
    const uint64_t seed = seeds[n];
    FuzzProblem f;
    timed(t_generate, [&] { f = random_problem(seed); });
    const std::string where = "problem " + std::to_string(n) + " (--replay " + std::to_string(seed) + ") [" + describe(f) + "]";
    if (opt.verbose) std::cout << "run " << where << std::endl;
    std::vector<std::string> failures;
    try {
      Inputs in;
      timed(t_generate, [&] { in = gradcheck::random_inputs(f.c, f.dlse, seed ^ 0x5DEECE66Dull); });
      Outputs got, half, exact;
      try {
        timed(t_device, [&] { got = gradcheck::run(f.c, f.c.dtype, opt.device, in); });
      } catch (const tilewise::Error& e) {  // an unsupported combination: refused, not wrong
        std::string reason = e.what();
        if (reason.size() > 100) reason = reason.substr(0, 100) + "...";
        ++skipped[reason];
        if (opt.verbose) std::cout << "  skipped: " << e.what() << std::endl;
        continue;
      }
      timed(t_reference, [&] {
        half = gradcheck::run(f.c, f.c.dtype, Device::cpu, in);
        exact = gradcheck::run(f.c, DType::f64, Device::cpu, in);
      });
      ++checked;
      std::array<gradcheck::Verdict, gradcheck::kNumTensors> verdicts;
      timed(t_checks, [&] {
        failures = gradcheck::structural_problems(f.c, got, true);
        verdicts = gradcheck::judge(got, half, exact, f.c.dtype);
      });
      for (const gradcheck::Verdict& v : verdicts) {
        Worst& w = worst[v.tensor];
        if (v.err > w.err || std::isnan(v.err)) w = {v.err, v.bound, v.err_vs_half, seed, describe(f)};
        if (!v.ok) failures.push_back(v.describe());
      }
    } catch (const gradcheck::CudaFailure& e) {
      failures.push_back(e.what());
      context_lost = true;
    } catch (const std::exception& e) {  // the CPU reference refusing is a harness or reference bug
      failures.push_back(std::string("exception: ") + e.what());
    }
    if (!failures.empty()) {
      ++failed;
      for (const std::string& line : failures) std::cout << "FAIL " << where << ": " << line << std::endl;
    }
    if (context_lost) {
      std::cout << "stopping: the CUDA context is lost after a fault, every later run would fail too" << std::endl;
      break;
    }
    if ((n + 1) % 100 == 0)
      std::cerr << "  " << n + 1 << " problems, " << failed << " failed, " << fmt(elapsed()) << " s" << std::endl;
  }

  // Summary.
  int64_t skipped_total = 0;
  for (const auto& [reason, count] : skipped) skipped_total += count;
  std::cout << "\n| tensor | worst rel L2 vs float64 | bound there | vs CPU 16-bit there | problem |\n|---|---|---|---|---|\n";
  for (int t = 0; t < gradcheck::kNumTensors; ++t) {
    const Worst& w = worst[t];
    if (w.err < 0) {
      std::cout << "| " << gradcheck::kTensorNames[t] << " | - | - | - | none checked |\n";
      continue;
    }
    std::cout << "| " << gradcheck::kTensorNames[t] << " | " << fmt(w.err) << " | " << fmt(w.bound) << " | "
              << fmt(w.err_vs_half) << " | --replay " << w.seed << ": " << w.problem << " |\n";
  }
  std::cout << "\nproblems: " << run << " of " << seeds.size() << (out_of_time ? " (stopped at --max-seconds)" : "")
            << ", checked: " << checked << ", failed: " << failed << ", skipped: " << skipped_total
            << ", time: " << fmt(elapsed()) << " s (generating " << fmt(t_generate) << ", " << tilewise::to_string(opt.device)
            << " runs " << fmt(t_device) << ", CPU reference runs " << fmt(t_reference) << ", checks " << fmt(t_checks)
            << "), seed: " << opt.seed << "\n";
  for (const auto& [reason, count] : skipped) std::cout << "  skipped " << count << " x (" << reason << ")\n";
  if (checked == 0) std::cout << "nothing was checked: every problem was refused\n";
  const bool ok = failed == 0 && checked > 0 && !context_lost;
  std::cout << (ok ? "PASS" : "FAIL") << std::endl;
  return ok ? 0 : 1;
}
