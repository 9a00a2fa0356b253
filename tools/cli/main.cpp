// tilewise CLI: demo, check and bench over the public C++ API. Parsing lives in args.hpp/resolve.hpp,
// device memory in device.hpp, inputs/reference/timing in workload.hpp; this file only runs the commands.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "args.hpp"
#include "progress.hpp"
#include "tilewise/tilewise.h"
#include "resolve.hpp"
#include "workload.hpp"

namespace tilewise::cli {
namespace {

std::string str(const Dim3& d) {
  return std::to_string(d.t) + "x" + std::to_string(d.h) + "x" + std::to_string(d.w);
}

std::string describe_pattern(const Pattern& p) {
  switch (p.kind) {
    case PatternKind::sliding_tile: {
      bool same = true;  // a normalised pattern repeats one window per head: print it once
      for (const HeadParams& h : p.heads) same = same && h.window == p.heads[0].window;
      if (same) return "sta " + str(p.heads[0].window);
      std::string s = "sta ";
      for (size_t h = 0; h < p.heads.size(); ++h) s += (h ? "," : "") + str(p.heads[h].window);
      return s;
    }
    case PatternKind::attention_tile:
      return "attention-tile g=" + std::to_string(p.heads[0].global_frames) + " r=" + std::to_string(p.heads[0].radius);
    default:
      return to_string(p.kind);
  }
}

void print_problem(const Config& c, const Plan& plan) {
  const Problem& p = plan.problem();
  const TileGrid& g = plan.grid();
  std::string lens;
  for (size_t b = 0; b < c.text_len.size(); ++b) lens += (b ? "," : "") + std::to_string(c.text_len[b]);
  std::printf("  shape     batch %lld, %lld heads (kv %lld), head dim %lld, %s%s, %s\n", (long long)p.batch,
              (long long)p.q_heads, (long long)p.kv_heads, (long long)p.head_dim, to_string(p.dtype),
              p.precision == Precision::native ? "" : (std::string(" in ") + to_string(p.precision)).c_str(),
              p.layout == Layout::bshd ? "bshd" : "bhsd");
  std::printf("            latent %s = %lld video tokens, tile %s -> %s tiles%s, %s order\n", str(p.latent).c_str(),
              (long long)g.num_tokens(), str(p.tile).c_str(), str(g.tiles).c_str(),
              g.tiles_evenly() ? "" : " (partial at the edges)", p.order == TokenOrder::raster ? "raster" : "tiled");
  if (p.text_capacity == 0)
    std::printf("            no text -> sequence %lld\n", (long long)p.seq_len);
  else
    std::printf("            text %s valid of %lld (%s) -> sequence %lld\n", lens.c_str(), (long long)p.text_capacity,
                p.text_position == TextPosition::last ? "after the video" : "before the video", (long long)p.seq_len);
  const double density = plan.video_density();
  std::printf("  pattern   %s: sparsity %.1f%% of video-video pairs (density %.1f%%)\n",
              describe_pattern(c.pattern).c_str(), 100 * (1 - density), 100 * density);
}

void print_error(const ErrorStats& e) {
  std::printf("  error     rel L2 %.2e, max abs %.2e vs float64 reference with the same mask (%s); NaN %lld\n",
              e.rel_l2, e.max_abs,
              e.sampled ? (std::to_string(e.rows) + " sampled rows of " + std::to_string(e.total_rows)).c_str()
                        : "all rows",
              (long long)e.nan);
}

int64_t default_iters(const Config& c, Device d) {
  if (c.iters) return *c.iters;
  if (c.command == Command::demo) return d == Device::cpu ? 1 : 10;
  return d == Device::cpu ? 5 : 20;
}

int64_t warmups(const Config& c, Device d) {
  if (d != Device::cpu) return 3;
  return c.command == Command::bench ? 1 : 0;  // the CPU needs no warm-up; the demo stays quick
}

/// Seconds one CPU run of `plan` is expected to take (0 off the CPU, or for runs too small to matter); the
/// probe that measures the CPU's rate runs once per process, and only for large problems.
double expected_seconds(const Plan& plan, const Config& c) {
  if (plan.device() != Device::cpu || c.progress == ProgressMode::never) return 0;
  const double flops = plan.flops(c.text_len.data());
  if (flops < 1e10 && c.progress == ProgressMode::automatic) return 0;  // ~1 s at slow CPU rates: no probe
  static const double rate = cpu_flop_rate(plan.problem());
  return flops / rate;
}

/// A progress line on stderr while `runs` runs of plan go on, when they are long (CPU runs at HunyuanVideo
/// size) or --progress always.
Progress progress_of(const char* what, int64_t runs, const Plan& plan, const Config& c) {
  return Progress(what, runs, expected_seconds(plan, c),
                  c.progress == ProgressMode::always && plan.device() == Device::cpu);
}

/// median_ms with progress.
double timed(const char* what, const Plan& plan, DeviceTensors& t, int64_t iters, int64_t warmup, const Config& c) {
  Progress progress = progress_of(what, iters + warmup, plan, c);
  return median_ms(plan, t, iters, warmup, [&] { progress.finished_run(); });
}

int demo(const Config& c) {
  const Device dev = c.devices[0];
  const Plan sparse(c.problem, c.pattern, dev), dense(c.problem, Pattern::dense(), dev);
  std::printf("tilewise demo on %s, seed %llu\n", to_string(dev), (unsigned long long)c.seed);
  print_problem(c, sparse);
  std::fflush(stdout);
  const Inputs in = random_inputs(sparse.problem(), c.seed);
  DeviceTensors t(dev, in, c.text_len);
  const int64_t iters = default_iters(c, dev);
  const double ms_sparse = timed("sparse", sparse, t, iters, warmups(c, dev), c);
  const std::vector<std::byte> o = t.o.download();  // before the dense runs overwrite o
  const double ms_dense = timed("dense", dense, t, iters, warmups(c, dev), c);
  std::printf("  time      sparse %.2f ms, dense %.2f ms on %s (median of %lld): %.2fx speedup\n", ms_sparse, ms_dense,
              to_string(dev), (long long)iters, ms_dense / ms_sparse);
  std::fflush(stdout);
  print_error(compare_to_reference(sparse, in, o, c.text_len, c.ref_rows, c.seed));
  return 0;
}

int check(const Config& c) {
  const Device dev = c.devices[0];
  const Plan plan(c.problem, c.pattern, dev);
  std::printf("tilewise check on %s, seed %llu\n", to_string(dev), (unsigned long long)c.seed);
  print_problem(c, plan);
  const Inputs in = random_inputs(plan.problem(), c.seed);
  DeviceTensors t(dev, in, c.text_len);
  {
    Progress progress = progress_of("run", 1, plan, c);
    plan.run(t.view());
    synchronize(dev);
    progress.finished_run();
  }
  const ErrorStats e = compare_to_reference(plan, in, t.o.download(), c.text_len, c.ref_rows, c.seed);
  print_error(e);
  const DType dt = c.problem.dtype;
  // The spec's bounds against float64: docs/semantics.md (1e-2 for bf16/f16) and its section 11.5 for FP8.
  const bool fp8 = c.problem.precision != Precision::native;
  const double tol = fp8 ? 0.12 : dt == DType::f64 ? 1e-10 : dt == DType::f32 ? 1e-5 : 1e-2;
  const bool ok = e.rel_l2 <= tol && e.nan == 0;  // also false for a NaN rel L2
  std::printf("  %s      rel L2 %.2e %s tolerance %.2g for %s%s%s\n", ok ? "PASS" : "FAIL", e.rel_l2,
              e.rel_l2 <= tol ? "within" : "above", tol, to_string(dt), fp8 ? " in fp8" : "",
              e.nan ? ", and NaN outputs" : "");
  return ok ? 0 : 1;
}

int bench(const Config& c) {
  // Plan every backend first: a bad --device fails before minutes of timing, not after.
  struct Row {
    Device device;
    Plan sparse, dense;
  };
  std::vector<Row> rows;
  for (Device dev : c.devices)
    rows.push_back({dev, Plan(c.problem, c.pattern, dev), Plan(c.problem, Pattern::dense(), dev)});
  std::printf("tilewise bench, seed %llu: median of timed runs after warm-up\n", (unsigned long long)c.seed);
  print_problem(c, rows[0].sparse);
  const Inputs in = random_inputs(rows[0].sparse.problem(), c.seed);
  const int w = static_cast<int>(std::max<size_t>(describe_pattern(c.pattern).size(), 7));
  std::printf("\n%-14s %-*s %11s %10s %8s %6s\n", "backend", w, "pattern", "ms", "GFLOP/s", "speedup", "iters");
  for (const Row& r : rows) {
    DeviceTensors t(r.device, in, c.text_len);
    const int64_t iters = default_iters(c, r.device);
    const double ms_dense = timed("dense", r.dense, t, iters, warmups(c, r.device), c);
    const auto print = [&](const Plan& plan, double ms) {
      std::printf("%-14s %-*s %11.3f %10.2f %7.2fx %6lld\n", to_string(r.device), w,
                  describe_pattern(plan.pattern()).c_str(), ms, plan.flops(c.text_len.data()) / (ms * 1e6),
                  ms_dense / ms, (long long)iters);
      std::fflush(stdout);
    };
    if (c.pattern.kind != PatternKind::dense)
      print(r.sparse, timed("sparse", r.sparse, t, iters, warmups(c, r.device), c));
    print(r.dense, ms_dense);
  }
  return 0;
}

/// "tilewise: error: invalid ..." on stderr; library errors also name the flag that set the argument.
void print_failure(std::string what, const std::string& flag) {
  if (what.rfind("tilewise: ", 0) == 0) what.erase(0, 10);  // some run-time errors carry their own prefix
  std::fprintf(stderr, "tilewise: error: %s%s\n", what.c_str(), flag.empty() ? "" : (" (set by " + flag + ")").c_str());
}

}  // namespace
}  // namespace tilewise::cli

int main(int argc, char** argv) {
  using namespace tilewise::cli;
  try {
    const Options opts = parse_args(argc, argv);
    if (opts.help) {
      std::fputs(help_text(opts.command).c_str(), stdout);
      return 0;
    }
    if (opts.version) {  // the library's version: the CLI is linked against it, and both come from VERSION
      std::printf("tilewise %s\n", tw_version());
      return 0;
    }
    const Config config = resolve(opts);
    switch (config.command) {
      case Command::demo: return demo(config);
      case Command::check: return check(config);
      case Command::bench: return bench(config);
    }
  } catch (const tilewise::Error& e) {
    // Usage errors (from parsing) and invalid problems (from the library) alike: exit code 2.
    const std::string arg = e.argument();
    print_failure(e.what(), arg.rfind("--", 0) == 0 ? "" : flag_for(arg));
    return 2;
  } catch (const std::bad_alloc&) {
    print_failure("out of host memory for this problem (q, k, v and o are held on the host)", "");
    return 1;
  } catch (const std::exception& e) {
    print_failure(e.what(), "");
    return 1;
  }
  return 1;
}
