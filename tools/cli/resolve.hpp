// Turns parsed Options into a runnable configuration: the default problem for the device, overridden by the
// flags, with the checks that involve several flags (the library checks the problem itself).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <unistd.h>

#include "args.hpp"

namespace tilewise::cli {

/// The default problems: a small one that runs in about a second on a 2-core CPU, and HunyuanVideo 720p
/// (the STA paper's setting) for a CUDA device.
struct Preset {
  Dim3 latent, tile, window;
  int64_t heads, head_dim, text, text_len;
};
inline constexpr Preset kSmall{{8, 16, 16}, {2, 4, 4}, {3, 3, 3}, 4, 64, 32, 20};
inline constexpr Preset kHunyuan{{30, 48, 80}, {6, 8, 8}, {3, 3, 3}, 24, 128, 256, 226};

struct Config {
  Command command = Command::demo;
  Problem problem;
  Pattern pattern;
  std::vector<int32_t> text_len;  // [batch], host
  std::vector<Device> devices;
  uint64_t seed = 0;
  std::optional<int64_t> iters;     // unset: the command's default for the device
  std::optional<int64_t> ref_rows;  // unset: all rows when affordable
  ProgressMode progress = ProgressMode::automatic;
};

inline std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

/// Flags that only one pattern reads: giving them with another pattern is a mistake, not a no-op.
inline void reject_unused(const Options& o, PatternKind kind) {
  const auto reject = [&](const char* flag, const char* expected) {
    if (o.has(flag)) throw Error(flag, o.value_of(flag), expected);
  };
  if (kind != PatternKind::sliding_tile) {
    reject("--window", "no window unless --pattern sta (windows are sliding-tile parameters)");
    reject("--windows", "no windows unless --pattern sta (windows are sliding-tile parameters)");
  }
  if (kind != PatternKind::attention_tile) {
    reject("--global-frames", "no --global-frames unless --pattern attention-tile");
    reject("--radius", "no --radius unless --pattern attention-tile");
  }
}

/// The CLI holds q, k, v and o on the host: refuse sizes that cannot fit before planning loops over them.
inline void check_fits_in_memory(const Problem& p) {
  const double S = static_cast<double>(p.latent.t) * p.latent.h * p.latent.w + p.text_capacity;
  const double bytes =
      static_cast<double>(p.batch) * S * (2.0 * p.q_heads + 2.0 * p.kv_heads) * p.head_dim * dtype_size(p.dtype);
  const double host = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (host > 0 && bytes > host) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%.3g bytes for q, k, v and o", bytes);
    std::string expected(buf);
    std::snprintf(buf, sizeof buf, "at most the host memory, %.3g bytes (smaller --latent, --heads, --batch)", host);
    throw Error("problem size", expected, buf);
  }
}

inline Config resolve(const Options& o) {
  Config c;
  c.command = *o.command;
  c.devices = o.devices;
  if (c.devices.empty()) c.devices = {cuda_available() ? Device::cuda : Device::cpu};
  if (c.command != Command::bench && c.devices.size() > 1) {
    std::string all;
    for (Device d : c.devices) all += (all.empty() ? "" : ",") + std::string(to_string(d));
    throw Error("--device", all, "one device for demo and check (bench compares several)");
  }
  // HunyuanVideo-sized defaults only when no CPU backend has to run them.
  const bool all_cuda = std::all_of(c.devices.begin(), c.devices.end(), [](Device d) { return d != Device::cpu; });
  const Preset& d = all_cuda ? kHunyuan : kSmall;

  Problem& p = c.problem;
  p.batch = o.batch.value_or(1);
  p.q_heads = o.heads.value_or(d.heads);
  p.kv_heads = o.kv_heads.value_or(p.q_heads);
  if (p.q_heads % p.kv_heads != 0)
    throw Error("--kv-heads", std::to_string(p.kv_heads),
                "a divisor of --heads = " + std::to_string(p.q_heads) + " (grouped-query attention)");
  p.head_dim = o.head_dim.value_or(d.head_dim);
  p.dtype = o.dtype.value_or(DType::bf16);
  p.latent = o.latent.value_or(d.latent);
  p.tile = o.tile.value_or(d.tile);
  p.text_capacity = o.text.value_or(d.text);
  p.text_position = o.text_position.value_or(TextPosition::last);
  p.order = o.order.value_or(TokenOrder::raster);
  p.layout = o.layout.value_or(Layout::bshd);
  p.precision = o.precision.value_or(Precision::native);
  p.sm_margin = o.sm_margin.value_or(0);

  // Text lengths: the preset's only while the capacity is the preset's too.
  std::vector<int64_t> lens = o.text_len.value_or(
      std::vector<int64_t>{o.text ? p.text_capacity : std::min<int64_t>(d.text_len, p.text_capacity)});
  if (lens.size() != 1 && static_cast<int64_t>(lens.size()) != p.batch)
    throw Error("--text-len", join(lens), "1 value or --batch = " + std::to_string(p.batch) + " values");
  for (int64_t n : lens)
    if (n > p.text_capacity)
      throw Error("--text-len", join(lens),
                  "values in [0, --text = " + std::to_string(p.text_capacity) + "] (valid tokens <= capacity)");
  c.text_len.assign(p.batch, 0);
  for (int64_t b = 0; b < p.batch; ++b) c.text_len[b] = static_cast<int32_t>(lens.size() == 1 ? lens[0] : lens[b]);

  const PatternKind kind = o.pattern.value_or(PatternKind::sliding_tile);
  reject_unused(o, kind);
  if (o.has("--window") && o.has("--windows"))
    throw Error("--windows", o.value_of("--windows"), "either --window (all heads) or --windows (per head), not both");
  if (kind == PatternKind::sliding_tile) {
    const std::vector<Dim3> ws = o.windows.value_or(std::vector<Dim3>{d.window});
    if (ws.size() != 1 && static_cast<int64_t>(ws.size()) != p.q_heads)
      throw Error(o.windows_flag, o.value_of(o.windows_flag),
                  "1 window or --heads = " + std::to_string(p.q_heads) + " windows (one per head), got " +
                      std::to_string(ws.size()));
    c.pattern = Pattern::sliding_tile(ws);
  } else if (kind == PatternKind::attention_tile) {
    c.pattern = Pattern::attention_tile(o.global_frames.value_or(1), o.radius.value_or(0));
  } else {
    c.pattern = Pattern::dense();
  }

  check_fits_in_memory(p);

  // Fresh inputs every run unless asked otherwise; the seed is printed so a run can be repeated.
  c.seed = o.seed.value_or(static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()) %
                           1000000007ull);
  c.iters = o.iters;
  c.ref_rows = o.ref_rows;
  c.progress = o.progress;
  return c;
}

/// The flag behind a library error's argument, so "invalid order = tiled: ..." also says "--order".
inline std::string flag_for(const std::string& argument) {
  static const std::pair<const char*, const char*> map[] = {
      {"q_heads", "--heads"}, {"kv_heads", "--kv-heads"}, {"head_dim", "--head-dim"}, {"latent", "--latent"},
      {"tile", "--tile"}, {"order", "--order"}, {"device", "--device"}, {"text_len", "--text-len"},
      {"window", "--window/--windows"}, {"windows", "--windows"}, {"global_frames", "--global-frames"},
      {"radius", "--radius"}, {"text_capacity", "--text"}, {"batch", "--batch"}, {"dtype", "--dtype"}};
  const std::string base = argument.substr(0, std::min(argument.find('['), argument.find(' ')));
  for (const auto& [arg, flag] : map)
    if (base == arg) return flag;
  return {};
}

}  // namespace tilewise::cli
