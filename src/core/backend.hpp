// Internal: the interface every backend implements, and the factories the Plan calls.
// A backend is built once from a validated Plan (it may check device-specific limits and precompute device
// tables there) and `run` only executes.
#pragma once

#include <memory>

#include "tilewise/tilewise.hpp"

namespace tilewise {

class Backend {
 public:
  virtual ~Backend() = default;
  /// Scratch bytes run needs on the device (0: none); `workspace` null = the backend's own.
  virtual size_t workspace_bytes(const Plan&) const { return 0; }
  virtual void run(const Plan& plan, const Tensors& tensors, void* stream, void* workspace) const = 0;
  /// Scratch bytes run_backward needs on the device (0: none).
  virtual size_t backward_workspace_bytes(const Plan&) const { return 0; }
  /// Throws tilewise::Error (argument "backward") where the backend has no backward for this plan.
  virtual void run_backward(const Plan& plan, const GradTensors& tensors, void* stream, void* workspace,
                            bool deterministic) const = 0;
  /// Plan::quantize_fp8 (inputs: q, k, v, text_len). The default throws tilewise::Error (argument "device"): a
  /// backend without it.
  virtual void quantize_fp8(const Plan& plan, const Tensors& inputs, const Fp8Tensors& out, void* stream) const;
};

std::unique_ptr<Backend> make_cpu_backend(const Plan& plan);
/// Throws tilewise::Error (argument "device") when built without CUDA or when no usable GPU is present.
std::unique_ptr<Backend> make_cuda_backend(const Plan& plan);
std::unique_ptr<Backend> make_cuda_reference_backend(const Plan& plan);

}  // namespace tilewise
