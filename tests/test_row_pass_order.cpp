// The row passes' CTA order (src/backends/cuda/row_pass_order.hpp), checked on the CPU: each order visits every
// (chunk, head) pair exactly once, and consecutive CTAs share what the memory layout puts side by side (the heads
// of a chunk for [B, S, H, D], the chunks of a head for [B, H, S, D]).
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <set>
#include <utility>

#include "backends/cuda/row_pass_order.hpp"

namespace {

using tilewise::cuda::RowPassOrder;

TEST(RowPassOrder, ChoosesHeadsInnerForSequenceMajorLayouts) {
  // [B, S, H, D] with H = 24, D = 128: a head is 128 elements from the next, a token 3072 from the next.
  EXPECT_TRUE(RowPassOrder::of(10, 24, 128, 24 * 128).heads_inner);
  // [B, H, S, D] with S = 1000: the other way round.
  EXPECT_FALSE(RowPassOrder::of(10, 24, 1000 * 128, 128).heads_inner);
}

TEST(RowPassOrder, GridPastTheLimitIsZeroSoTheLaunchFails) {
  EXPECT_EQ(RowPassOrder::of(1000, 24, 128, 3072).grid(), 24000u);
  EXPECT_EQ((RowPassOrder{int64_t{1} << 20, int64_t{1} << 11, true}.grid()), 0u);  // 2^31 CTAs
  EXPECT_EQ((RowPassOrder{(int64_t{1} << 31) - 1, 1, true}.grid()), 0x7fffffffu);
}

TEST(RowPassOrder, EveryPairOnceInBothOrders) {
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t chunks = 1 + rng() % 97, heads = 1 + rng() % 53;
    for (const bool inner : {true, false}) {
      const RowPassOrder order{chunks, heads, inner};
      ASSERT_EQ(order.ctas(), chunks * heads);
      std::set<std::pair<int64_t, int64_t>> seen;
      for (uint32_t cta = 0; cta < order.ctas(); ++cta) {
        const int64_t c = order.chunk(cta), h = order.head(cta);
        ASSERT_GE(c, 0);
        ASSERT_LT(c, chunks);
        ASSERT_GE(h, 0);
        ASSERT_LT(h, heads);
        ASSERT_TRUE(seen.insert({c, h}).second) << "chunk " << c << " head " << h << " twice";
        if (cta > 0 && inner && h > 0) {  // heads inner: the previous CTA took the same chunk's previous head
          EXPECT_EQ(order.chunk(cta - 1), c);
          EXPECT_EQ(order.head(cta - 1), h - 1);
        }
        if (cta > 0 && !inner && c > 0) {  // chunks inner: the same head's previous chunk
          EXPECT_EQ(order.head(cta - 1), h);
          EXPECT_EQ(order.chunk(cta - 1), c - 1);
        }
      }
      EXPECT_EQ(static_cast<int64_t>(seen.size()), chunks * heads);
    }
  }
}

}  // namespace
