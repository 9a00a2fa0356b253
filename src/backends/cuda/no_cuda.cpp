// Stand-in for the CUDA backend when tilewise is built without CUDA (TILEWISE_CUDA=OFF).
#include "core/backend.hpp"
#include "core/errors.hpp"

namespace tilewise {

bool cuda_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend(const Plan&) {
  detail::fail("device", "cuda", "cpu: this build of tilewise has no CUDA support (configure with TILEWISE_CUDA=ON)");
}
std::unique_ptr<Backend> make_cuda_reference_backend(const Plan&) {
  detail::fail("device", "cuda-reference", "cpu: this build of tilewise has no CUDA support");
}

}  // namespace tilewise
