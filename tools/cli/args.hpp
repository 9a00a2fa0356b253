// Command-line parsing for the tilewise CLI: the flag table, value parsers and the --help text.
//
// Parsing only checks each value on its own (syntax and range) and records what was given; resolve.hpp
// combines the flags with a default problem and checks them against each other. Every error is a
// tilewise::Error naming the flag, so the CLI and the library report mistakes in one format:
// "invalid --heads = abc: expected an integer >= 1".
//
// Header-only because the CMake target of the CLI compiles tools/cli/main.cpp alone.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tilewise/tilewise.hpp"

namespace tilewise::cli {

enum class Command { demo, check, bench };

/// When long CPU runs print progress on stderr: auto = runs expected to take more than a few seconds.
enum class ProgressMode { automatic, always, never };

/// What the command line said. Unset optionals take the default problem's values (see resolve.hpp), which
/// depend on the device, so they cannot be filled in here.
struct Options {
  std::optional<Command> command;
  bool help = false;
  bool version = false;  // --version: print tw_version() and exit
  std::optional<Dim3> latent, tile;
  std::optional<std::vector<Dim3>> windows;  // --window (one entry) or --windows (one per head)
  std::string windows_flag;                  // which of the two set `windows`, for error messages
  std::optional<int64_t> heads, kv_heads, head_dim, text, batch, global_frames, radius, iters, ref_rows, sm_margin;
  std::optional<Precision> precision;
  ProgressMode progress = ProgressMode::automatic;
  std::optional<std::vector<int64_t>> text_len;
  std::optional<TextPosition> text_position;
  std::optional<PatternKind> pattern;
  std::optional<DType> dtype;
  std::optional<Layout> layout;
  std::optional<TokenOrder> order;
  std::optional<uint64_t> seed;
  std::vector<Device> devices;  // --device may repeat and take comma lists (bench compares backends)
  std::vector<std::string> given;  // the flags given, to reject ones that the chosen pattern ignores
  std::vector<std::string> raw;    // their values as typed, parallel to `given`

  bool has(std::string_view flag) const {
    for (const auto& g : given)
      if (g == flag) return true;
    return false;
  }
  std::string value_of(std::string_view flag) const {
    for (size_t i = given.size(); i-- > 0;)
      if (given[i] == flag) return raw[i];
    return {};
  }
};

// ---- value parsers: each throws tilewise::Error(flag, value, expected) ----

inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep)) parts.push_back(part);
  if (!s.empty() && s.back() == sep) parts.emplace_back();  // "3," has an empty second item
  return parts;
}

/// Whole-string integer parse; from_chars rejects "+3", " 3" and "3.0", which is what we want.
inline std::optional<int64_t> to_int(const std::string& s) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc{} || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

inline int64_t parse_int(const std::string& flag, const std::string& value, int64_t min) {
  const auto v = to_int(value);
  if (!v || *v < min) throw Error(flag, value, "an integer >= " + std::to_string(min));
  return *v;
}

inline std::optional<Dim3> to_dim3(const std::string& s) {
  const auto parts = split(s, 'x');
  if (parts.size() != 3) return std::nullopt;
  const auto t = to_int(parts[0]), h = to_int(parts[1]), w = to_int(parts[2]);
  if (!t || !h || !w || *t < 1 || *h < 1 || *w < 1) return std::nullopt;
  return Dim3{*t, *h, *w};
}

inline Dim3 parse_dim3(const std::string& flag, const std::string& value, const std::string& expected) {
  const auto d = to_dim3(value);
  if (!d) throw Error(flag, value, expected);
  return *d;
}

template <class T>
T parse_choice(const std::string& flag, const std::string& value,
               const std::vector<std::pair<std::string, T>>& choices) {
  std::string names;
  for (size_t i = 0; i < choices.size(); ++i) {
    if (choices[i].first == value) return choices[i].second;
    names += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + choices[i].first;
  }
  throw Error(flag, value, names);
}

// ---- the flag table ----

struct Flag {
  const char* name;
  const char* metavar;  // empty: the flag takes no value
  const char* help;
  std::function<void(Options&, const std::string& flag, const std::string& value)> set;
};

inline const std::vector<Flag>& flags() {
  static const std::vector<Flag> table = {
      {"--latent", "TxHxW", "latent video grid in tokens (frames x height x width)",
       [](Options& o, const auto& f, const auto& v) {
         o.latent = parse_dim3(f, v, "three sizes >= 1 as TxHxW, e.g. 30x48x80");
       }},
      {"--tile", "txhxw", "tile shape in tokens; partial tiles at the edges are allowed",
       [](Options& o, const auto& f, const auto& v) { o.tile = parse_dim3(f, v, "three sizes >= 1 as txhxw, e.g. 6x8x8"); }},
      {"--window", "kxkxk", "sliding-tile window in tiles, the same for every head",
       [](Options& o, const auto& f, const auto& v) {
         o.windows = {parse_dim3(f, v, "three window sizes >= 1 in tiles as kxkxk, e.g. 3x3x3")};
         o.windows_flag = f;
       }},
      {"--windows", "kxkxk,...", "sliding-tile windows in tiles, one per head",
       [](Options& o, const auto& f, const auto& v) {
         std::vector<Dim3> ws;
         for (const auto& item : split(v, ',')) {
           const auto d = to_dim3(item);
           if (!d) throw Error(f, v, "comma-separated windows kxkxk (sizes >= 1 in tiles), one per head, e.g. 3x3x3,1x5x5");
           ws.push_back(*d);
         }
         if (ws.empty()) throw Error(f, v, "comma-separated windows kxkxk (sizes >= 1 in tiles), one per head");
         o.windows = ws;
         o.windows_flag = f;
       }},
      {"--heads", "N", "query heads", [](Options& o, const auto& f, const auto& v) { o.heads = parse_int(f, v, 1); }},
      {"--kv-heads", "N", "key/value heads, a divisor of --heads (grouped-query attention)",
       [](Options& o, const auto& f, const auto& v) { o.kv_heads = parse_int(f, v, 1); }},
      {"--head-dim", "N", "head dimension D", [](Options& o, const auto& f, const auto& v) { o.head_dim = parse_int(f, v, 1); }},
      {"--text", "N", "text positions in the sequence (capacity L_text; 0 = video only)",
       [](Options& o, const auto& f, const auto& v) { o.text = parse_int(f, v, 0); }},
      {"--text-len", "N[,N...]", "valid text tokens, one for all or one per batch element (default --text)",
       [](Options& o, const auto& f, const auto& v) {
         std::vector<int64_t> lens;
         for (const auto& item : split(v, ',')) {
           const auto n = to_int(item);
           if (!n || *n < 0) throw Error(f, v, "an integer >= 0, or a comma list of them (one per batch element)");
           lens.push_back(*n);
         }
         if (lens.empty()) throw Error(f, v, "an integer >= 0, or a comma list of them (one per batch element)");
         o.text_len = lens;
       }},
      {"--text-position", "first|last", "text after the video (last, HunyuanVideo) or before it (first, CogVideoX)",
       [](Options& o, const auto& f, const auto& v) {
         o.text_position = parse_choice<TextPosition>(f, v, {{"first", TextPosition::first}, {"last", TextPosition::last}});
       }},
      {"--pattern", "sta|attention-tile|dense", "which video keys a video query sees (default sta)",
       [](Options& o, const auto& f, const auto& v) {
         o.pattern = parse_choice<PatternKind>(f, v, {{"sta", PatternKind::sliding_tile},
                                                      {"attention-tile", PatternKind::attention_tile},
                                                      {"dense", PatternKind::dense}});
       }},
      {"--global-frames", "N", "attention-tile: frames every query sees and that see everything (default 1)",
       [](Options& o, const auto& f, const auto& v) { o.global_frames = parse_int(f, v, 0); }},
      {"--radius", "N", "attention-tile: a query also sees frames within N of its own (default 0)",
       [](Options& o, const auto& f, const auto& v) { o.radius = parse_int(f, v, 0); }},
      {"--dtype", "bf16|f16|f32|f64", "element type of q, k, v and o (default bf16)",
       [](Options& o, const auto& f, const auto& v) {
         o.dtype = parse_choice<DType>(f, v, {{"bf16", DType::bf16}, {"f16", DType::f16}, {"f32", DType::f32}, {"f64", DType::f64}});
       }},
      {"--precision", "native|fp8",
       "arithmetic: native (the dtype's) or fp8 (e4m3 Q, K, P, V with scales: docs/semantics.md section 11)",
       [](Options& o, const auto& f, const auto& v) {
         o.precision = parse_choice<Precision>(f, v, {{"native", Precision::native}, {"fp8", Precision::fp8}});
       }},
      {"--sm-margin", "N", "SMs the CUDA kernels leave free, e.g. for communication beside them (default 0)",
       [](Options& o, const auto& f, const auto& v) { o.sm_margin = parse_int(f, v, 0); }},
      {"--batch", "N", "batch size", [](Options& o, const auto& f, const auto& v) { o.batch = parse_int(f, v, 1); }},
      {"--layout", "bshd|bhsd", "tensor storage order (default bshd)",
       [](Options& o, const auto& f, const auto& v) {
         o.layout = parse_choice<Layout>(f, v, {{"bshd", Layout::bshd}, {"bhsd", Layout::bhsd}});
       }},
      {"--order", "raster|tiled", "order of the video tokens in the sequence (tiled needs tile | latent)",
       [](Options& o, const auto& f, const auto& v) {
         o.order = parse_choice<TokenOrder>(f, v, {{"raster", TokenOrder::raster}, {"tiled", TokenOrder::tiled}});
       }},
      {"--seed", "N", "seed of the random inputs (default: from the clock; printed)",
       [](Options& o, const auto& f, const auto& v) { o.seed = static_cast<uint64_t>(parse_int(f, v, 0)); }},
      {"--iters", "N", "timed runs, median reported (default: demo 1, bench 5 on cpu; 10/20 on cuda)",
       [](Options& o, const auto& f, const auto& v) { o.iters = parse_int(f, v, 1); }},
      {"--device", "cpu|cuda|cuda-reference",
       "backend (default cuda if present); bench takes several: repeat or comma list",
       [](Options& o, const auto& f, const auto& v) {
         const std::vector<std::pair<std::string, Device>> choices = {
             {"cpu", Device::cpu}, {"cuda", Device::cuda}, {"cuda-reference", Device::cuda_reference}};
         for (const auto& item : split(v, ',')) o.devices.push_back(parse_choice<Device>(f, item, choices));
         if (v.empty()) parse_choice<Device>(f, v, choices);  // throws: an empty value names no device
       }},
      {"--ref-rows", "N", "sampled rows per (batch, head) for the reference; 0 = all (default unless slow)",
       [](Options& o, const auto& f, const auto& v) { o.ref_rows = parse_int(f, v, 0); }},
      {"--progress", "auto|always|never",
       "elapsed time and estimate on stderr during CPU runs (default auto: runs longer than a few seconds)",
       [](Options& o, const auto& f, const auto& v) {
         o.progress = parse_choice<ProgressMode>(
             f, v, {{"auto", ProgressMode::automatic}, {"always", ProgressMode::always}, {"never", ProgressMode::never}});
       }},
  };
  return table;
}

inline const char* command_name(Command c) {
  return c == Command::demo ? "demo" : c == Command::check ? "check" : "bench";
}

inline const char* command_summary(Command c) {
  switch (c) {
    case Command::demo:
      return "run a default problem: sparsity, sparse vs dense time, error against a float64 reference";
    case Command::check:
      return "run one backend against the float64 CPU reference; exit 1 above tolerance (1e-2 bf16/f16, 1e-5 f32, "
             "0.12 fp8)";
    case Command::bench:
      return "time backends on a problem, the pattern against dense, as a table";
  }
  return "";
}

inline std::string help_text(std::optional<Command> command) {
  std::ostringstream s;
  const char* names[] = {"demo ", "check", "bench"};
  if (command) {
    s << "usage: tilewise " << command_name(*command) << " [flags]\n\n"
      << command_summary(*command) << ".\n";
  } else {
    s << "usage: tilewise <command> [flags]      tilewise <command> --help\n\n"
      << "Tile-sparse attention for video diffusion transformers.\n\ncommands:\n";
    for (int c = 0; c < 3; ++c) s << "  " << names[c] << "  " << command_summary(static_cast<Command>(c)) << "\n";
    s << "  calibrate  choose windows per (step, layer, head) from captured q/k/v (the pip-installed `tilewise`\n"
         "             command or `python -m tilewise.calibrate`; see docs/calibration.md)\n";
  }
  s << "\nflags (--flag VALUE or --flag=VALUE). Unset problem flags come from the default problem: on the CPU\n"
       "latent 8x16x16, tile 2x4x4, window 3x3x3, 4 heads, head dim 64, text 20 of 32, bf16; on CUDA\n"
       "HunyuanVideo: latent 30x48x80, tile 6x8x8, window 3x3x3, 24 heads, head dim 128, text 226 of 256, bf16.\n";
  std::vector<std::pair<std::string, std::string>> rows;
  for (const Flag& f : flags()) rows.emplace_back(std::string(f.name) + " " + f.metavar, f.help);
  rows.emplace_back("--help, -h", "this text");
  rows.emplace_back("--version", "the tilewise version");
  size_t width = 0;
  for (const auto& r : rows) width = std::max(width, r.first.size());
  for (auto& [head, help] : rows) s << "  " << head << std::string(width + 2 - head.size(), ' ') << help << "\n";
  return s.str();
}

/// Parses argv. Throws tilewise::Error for anything malformed (the caller prints it and exits with 2).
inline Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  size_t i = 0;
  if (i < args.size() && args[i].rfind("-", 0) != 0) {
    o.command = parse_choice<Command>("command", args[i],
                                      {{"demo", Command::demo}, {"check", Command::check}, {"bench", Command::bench}});
    ++i;
  }
  for (; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h") {
      o.help = true;
      continue;
    }
    if (arg == "--version") {
      o.version = true;
      continue;
    }
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const Flag* flag = nullptr;
    for (const Flag& f : flags())
      if (name == f.name) flag = &f;
    if (flag == nullptr) {
      if (arg.rfind("--", 0) != 0)
        throw Error("argument", arg, "a flag starting with -- (the command comes first: tilewise <command> [flags])");
      throw Error("flag", name, "one of the flags listed by `tilewise --help`");
    }
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      throw Error(name, "(missing)", std::string("a value: ") + flag->name + " " + flag->metavar);
    }
    flag->set(o, name, value);
    o.given.push_back(name);
    o.raw.push_back(value);
  }
  if (!o.command && !o.help && !o.version) throw Error("command", "(missing)", "demo, check or bench (see tilewise --help)");
  return o;
}

}  // namespace tilewise::cli
