// The dispatch from a run-time head dim to the Hopper kernels' instantiations (64, 96, 128): one place for the
// forward's, the backward's and the FP8 forward's launchers.
#pragma once

#include <type_traits>
#include <vector>

namespace tilewise::hopper {

/// f(std::integral_constant<int, D>{}) for a supported head dim D, else `unsupported`.
template <class R, class F>
R with_head_dim(int head_dim, R unsupported, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
  }
  return unsupported;
}

/// f(std::integral_constant<int, rows>{}) when `rows` is in kBuilt (bit 0: 128 rows, bit 1: 192; a kernel's
/// query rows per work item, KernelTraits' forward_rows_built), else `unsupported`.
template <int kBuilt, class R, class F>
R with_query_rows(int rows, R unsupported, F&& f) {
  if constexpr ((kBuilt & 1) != 0)
    if (rows == 128) return f(std::integral_constant<int, 128>{});
  if constexpr ((kBuilt & 2) != 0)
    if (rows == 192) return f(std::integral_constant<int, 192>{});
  return unsupported;
}

/// The rows of a kBuilt set of with_query_rows, ascending.
inline std::vector<int> query_rows_of(int built) {
  std::vector<int> rows;
  if (built & 1) rows.push_back(128);
  if (built & 2) rows.push_back(192);
  return rows;
}

}  // namespace tilewise::hopper
