// The forward kernels' query rows per work item (src/backends/cuda/query_rows.hpp), host planning checked on the
// CPU: the rule that chooses between the builds' 128 and 192 rows from the rows each would pad the plan to.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "backends/cuda/query_rows.hpp"

namespace {

using tilewise::cuda::choose_query_rows;

/// Rows of `tiles` tiles of `tokens` each, cut into blocks of `rows`, plus `text` text rows likewise: what the
/// backend counts for a plan of whole tiles without query runs.
int64_t padded(int64_t tiles, int64_t tokens, int64_t text, int rows) {
  auto up = [&](int64_t n) { return (n + rows - 1) / rows * rows; };
  return tiles * up(tokens) + up(text);
}

TEST(QueryRows, TheLargestWithinAnEighthOfTheFewestPaddedRows) {
  const std::vector<int> both{128, 192};
  // 6x8x8 tiles (384 tokens): two 192-row or three 128-row items, no padding either way.
  EXPECT_EQ(choose_query_rows(both, [](int r) { return padded(300, 384, 0, r); }), 192);
  // 1x8x16 tiles (128 tokens): one item either way, a third of the 192-row one idle.
  EXPECT_EQ(choose_query_rows(both, [](int r) { return padded(300, 128, 226, r); }), 128);
  // 4x8x8 tiles (256 tokens): 384 rows against 256.
  EXPECT_EQ(choose_query_rows(both, [](int r) { return padded(10, 256, 0, r); }), 128);
  // 5x8x8 tiles (320 tokens): 384 rows either way.
  EXPECT_EQ(choose_query_rows(both, [](int r) { return padded(10, 320, 0, r); }), 192);
  // The bound itself: exactly 9/8 of the fewest takes 192, one row more 128.
  EXPECT_EQ(choose_query_rows(both, [](int r) { return r == 128 ? int64_t{800} : int64_t{900}; }), 192);
  EXPECT_EQ(choose_query_rows(both, [](int r) { return r == 128 ? int64_t{800} : int64_t{901}; }), 128);
  // Fewer rows at 192 than at 128 (text of 129 rows: 192 against 256).
  EXPECT_EQ(choose_query_rows(both, [](int r) { return padded(0, 0, 129, r); }), 192);
}

TEST(QueryRows, OnlyWhatIsBuilt) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int64_t> n(1, 1 << 20);
  for (int i = 0; i < 100; ++i) {
    const int64_t a = n(rng), b = n(rng);
    auto rows = [&](int r) { return r == 128 ? a : b; };
    EXPECT_EQ(choose_query_rows({128}, rows), 128);
    EXPECT_EQ(choose_query_rows({192}, rows), 192);
    // Between both: 192 exactly when its padded rows are at most 9/8 of the fewest.
    EXPECT_EQ(choose_query_rows({128, 192}, rows), 8 * b <= 9 * std::min(a, b) ? 192 : 128) << a << " " << b;
  }
  EXPECT_EQ(choose_query_rows({}, [](int) { return int64_t{1}; }), 0);
}

}  // namespace
