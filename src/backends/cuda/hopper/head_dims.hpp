// The dispatch from a run-time head dim to the Hopper kernels' instantiations (64, 96, 128): one place for the
// forward's, the backward's and the FP8 forward's launchers.
#pragma once

#include <type_traits>

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

}  // namespace tilewise::hopper
