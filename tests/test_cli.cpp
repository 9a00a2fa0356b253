// The tilewise CLI as a user runs it: help, error messages and exit codes for malformed flags, and the demo,
// check and bench commands on small problems. The binary's path comes from TILEWISE_CLI (set by CMake).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tilewise/tilewise.h"

namespace {

struct Result {
  int code = -1;
  std::string output;
};

/// Runs `tilewise <args> <redirect>` through the shell; `redirect` picks which streams are captured.
Result run_cli(const std::string& args, const std::string& redirect = "2>&1") {
  const std::string command = "'" + std::string(std::getenv("TILEWISE_CLI")) + "' " + args + " " + redirect;
  Result r;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof buf, pipe)) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::getenv("TILEWISE_CLI") == nullptr) GTEST_SKIP() << "TILEWISE_CLI is not set";
  }
};

TEST_F(Cli, HelpMentionsEveryFlag) {
  for (const char* args : {"--help", "demo --help", "check --help", "bench -h"}) {
    const Result r = run_cli(args);
    EXPECT_EQ(r.code, 0) << args << "\n" << r.output;
    for (const char* flag : {"--latent", "--tile", "--window ", "--windows", "--heads", "--kv-heads", "--head-dim",
                             "--text ", "--text-len", "--text-position", "--pattern", "--global-frames", "--radius",
                             "--dtype", "--batch", "--layout", "--order", "--seed", "--iters", "--device", "--progress", "--help",
                             "--version", "--precision", "--sm-margin"})
      EXPECT_TRUE(contains(r.output, flag)) << args << " does not mention " << flag << ":\n" << r.output;
  }
  EXPECT_TRUE(contains(run_cli("--help").output, "demo"));
  EXPECT_TRUE(contains(run_cli("--help").output, "bench"));
}

struct Malformed {
  const char* args;
  std::vector<const char*> mentions;  // the flag, the value and (part of) what was expected
};

TEST_F(Cli, MalformedValuesAreUsageErrors) {
  const Malformed cases[] = {
      {"demo --latent 30x48", {"--latent", "30x48", "TxHxW"}},
      {"demo --latent 30x48x", {"--latent", "30x48x", "TxHxW"}},
      {"demo --heads abc", {"--heads", "abc", "integer >= 1"}},
      {"demo --heads 0", {"--heads", "= 0", "integer >= 1"}},
      {"demo --heads", {"--heads", "missing"}},
      {"demo --frobnicate 3", {"--frobnicate", "--help"}},
      {"frobnicate", {"command", "frobnicate", "demo, check or bench"}},
      {"demo --dtype int8", {"--dtype", "int8", "bf16, f16, f32 or f64"}},
      {"demo --text 256 --text-len 300", {"--text-len", "300", "256"}},
      {"check --text 16 --text-len 4,20 --batch 2", {"--text-len", "4,20", "16"}},
      {"demo --text-len 4,5 --batch 3", {"--text-len", "4,5", "--batch = 3"}},
      {"demo --kv-heads 3 --heads 4", {"--kv-heads", "3", "divisor of --heads = 4"}},
      {"demo --windows 3x3x3,1x1x1 --heads 4", {"--windows", "3x3x3,1x1x1", "--heads = 4"}},
      {"demo --window 3x0x3", {"--window", "3x0x3", ">= 1"}},
      {"demo --window 3x3x3 --windows 3x3x3", {"--windows", "not both"}},
      {"demo --pattern dense --window 3x3x3", {"--window", "3x3x3", "--pattern sta"}},
      {"demo --pattern sparse", {"--pattern", "sparse", "sta, attention-tile or dense"}},
      {"demo --layout bsdh", {"--layout", "bsdh", "bshd or bhsd"}},
      {"demo --progress sometimes", {"--progress", "sometimes", "auto, always or never"}},
      {"demo --precision fp4", {"--precision", "fp4", "native or fp8"}},
      {"demo --sm-margin -1", {"--sm-margin", "-1", "integer >= 0"}},
      {"bench --device cpu,tpu", {"--device", "tpu", "cpu, cuda or cuda-reference"}},
      {"check --device cpu --device cpu", {"--device", "one device"}},
      {"demo --latent 100000x100000x1000 --tile 1x1x1", {"problem size", "host memory"}},
      // Caught by the library, which names its argument; the CLI adds the flag.
      {"check --device cpu --order tiled --latent 5x8x8 --tile 2x4x4", {"order", "tiled", "--order", "multiple"}},
  };
  for (const Malformed& m : cases) {
    const Result r = run_cli(m.args);
    EXPECT_EQ(r.code, 2) << m.args << "\n" << r.output;
    EXPECT_EQ(r.output.rfind("tilewise: error: invalid ", 0), 0u) << m.args << "\n" << r.output;
    for (const char* part : m.mentions) EXPECT_TRUE(contains(r.output, part)) << m.args << ": no '" << part << "' in\n" << r.output;
    // Errors go to stderr alone: stdout stays clean for scripts.
    EXPECT_EQ(run_cli(m.args, "2>/dev/null").output, "") << m.args;
  }
}

TEST_F(Cli, DemoReportsSparsityTimeAndError) {
  const Result r = run_cli("demo --device cpu");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "sparsity")) << r.output;
  EXPECT_TRUE(contains(r.output, "speedup")) << r.output;
  EXPECT_TRUE(contains(r.output, "rel L2")) << r.output;
  EXPECT_TRUE(contains(r.output, "max abs")) << r.output;
  EXPECT_TRUE(contains(r.output, "NaN 0")) << r.output;
}

TEST_F(Cli, CheckPassesOnPartialTilesWithText) {
  // 5x9x11 over 2x4x4: partial tiles on every axis; per-head windows, GQA, per-batch text lengths.
  const std::string problem =
      "check --device cpu --latent 5x9x11 --tile 2x4x4 --heads 2 --kv-heads 1 --head-dim 32 --text 12 "
      "--text-len 7,12 --batch 2 ";
  for (const std::string extra : {"--windows 1x3x1,3x1x3", "--window 2x2x2 --dtype f16 --text-position first",
                                  "--window 1x1x1 --dtype f32 --layout bhsd",
                                  "--pattern attention-tile --global-frames 1 --radius 1 --dtype f32",
                                  "--pattern dense --ref-rows 16"}) {
    const Result r = run_cli(problem + extra);
    EXPECT_EQ(r.code, 0) << extra << "\n" << r.output;
    EXPECT_TRUE(contains(r.output, "PASS")) << extra << "\n" << r.output;
    EXPECT_TRUE(contains(r.output, "NaN 0")) << extra << "\n" << r.output;
  }
}

TEST_F(Cli, CheckFp8AgainstTheUnquantisedReference) {
  // The CPU reference's FP8 arithmetic (docs/semantics.md section 11), held to the spec's FP8 bound; full and
  // sampled references; a margin of SMs changes nothing on the CPU.
  for (const std::string extra : {"", "--ref-rows 8 --text-position first", "--sm-margin 100"}) {
    const Result r = run_cli("check --device cpu --latent 4x8x8 --tile 2x4x4 --heads 2 --head-dim 64 --text 9 "
                             "--precision fp8 " + extra);
    EXPECT_EQ(r.code, 0) << extra << "\n" << r.output;
    EXPECT_TRUE(contains(r.output, "PASS")) << extra << "\n" << r.output;
    EXPECT_TRUE(contains(r.output, "in fp8")) << extra << "\n" << r.output;
  }
}

TEST_F(Cli, CheckTiledOrder) {
  const Result r = run_cli("check --device cpu --latent 4x8x8 --tile 2x4x4 --order tiled --text 5 --seed 7");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "PASS")) << r.output;
}

TEST_F(Cli, BenchPrintsATable) {
  const Result r = run_cli("bench --device cpu --latent 4x8x8 --tile 2x4x4 --window 1x1x1 --iters 1");
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* part : {"backend", "GFLOP/s", "speedup", "sta 1x1x1", "dense", "1.00x"})
    EXPECT_TRUE(contains(r.output, part)) << part << "\n" << r.output;
}

TEST_F(Cli, VersionIsTheLibrarysFromTheVersionFile) {
  for (const char* args : {"--version", "demo --version"}) {
    const Result r = run_cli(args, "2>/dev/null");
    EXPECT_EQ(r.code, 0) << args;
    EXPECT_EQ(r.output, std::string("tilewise ") + TILEWISE_EXPECTED_VERSION + "\n") << args;
  }
  EXPECT_STREQ(tw_version(), TILEWISE_EXPECTED_VERSION);
}

TEST_F(Cli, ProgressGoesToStderrAndLeavesStdoutAlone) {
  const std::string problem = "check --device cpu --latent 4x8x8 --tile 2x4x4 --seed 3 ";
  const Result quiet = run_cli(problem + "--progress never", "2>/dev/null");
  const Result always = run_cli(problem + "--progress always", "2>&1 >/dev/null");
  const Result stdout_only = run_cli(problem + "--progress always", "2>/dev/null");
  ASSERT_EQ(quiet.code, 0) << quiet.output;
  EXPECT_EQ(stdout_only.output, quiet.output);  // the same report: progress never mixes into stdout
  EXPECT_TRUE(contains(always.output, "run: run 1 of 1, ")) << always.output;
  EXPECT_TRUE(contains(always.output, "elapsed of about ")) << always.output;
  EXPECT_TRUE(contains(always.output, "run: 1 run done in ")) << always.output;
  // A small problem by default (auto): far below the threshold, so nothing on stderr.
  EXPECT_EQ(run_cli(problem, "2>&1 >/dev/null").output, "");
  const Result demo = run_cli("demo --device cpu --latent 4x8x8 --tile 2x4x4 --progress always", "2>&1 >/dev/null");
  EXPECT_TRUE(contains(demo.output, "sparse: 1 run done in ")) << demo.output;
  EXPECT_TRUE(contains(demo.output, "dense: 1 run done in ")) << demo.output;
}

}  // namespace
