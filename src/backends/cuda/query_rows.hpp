// The forward kernels' query rows per work item, chosen per plan among those built for the head dim (host planning,
// apart from the kernels; plain C++, so the CPU tests check the rule).
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

namespace tilewise::cuda {

/// Among the `built` rows per work item (128 = two consumer warpgroups, 192 = three; ascending), the largest whose
/// work items hold at most 1/8 more rows, padding included, than the fewest any choice holds: `padded(rows)` counts
/// them for the plan (the tiles' query blocks, or its query runs' blocks where the plan takes runs, and the text
/// blocks). Three warpgroups take turns hiding the exponentials where their rows are filled (at head dim 64 in bf16:
/// 384-token tiles -12.9%, CogVideoX's query runs -9.7%; in FP8: 384-token tiles -22.8%), and cost 2% (bf16) to 5.5%
/// (FP8) where 128-token tiles leave the third idle (docs/performance.md, "FP8: does the SM overlap ...", calls 8-10,
/// and the thirty-second session's item sizes). 0 when nothing is built.
template <class PaddedRows>
int choose_query_rows(const std::vector<int>& built, PaddedRows&& padded) {
  std::vector<int64_t> rows_of(built.size());
  int64_t fewest = std::numeric_limits<int64_t>::max();
  for (size_t i = 0; i < built.size(); ++i) {
    rows_of[i] = padded(built[i]);
    fewest = rows_of[i] < fewest ? rows_of[i] : fewest;
  }
  int choice = 0;
  for (size_t i = 0; i < built.size(); ++i)
    if (8 * rows_of[i] <= 9 * fewest && built[i] > choice) choice = built[i];
  return choice;
}

}  // namespace tilewise::cuda
