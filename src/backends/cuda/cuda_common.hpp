// Internal helpers shared by the CUDA backends: error checking, device properties, owned device buffers and
// the per-plan device tables (head parameters, block lists) that both kernels read.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.hpp"
#include "core/errors.hpp"

namespace tilewise::cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("tilewise: CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

/// A device allocation owned by a plan: allocated once when the plan is made, never during run().
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(const std::vector<T>& host) {
    if (host.empty()) return;
    check(cudaMalloc(&ptr_, host.size() * sizeof(T)), "cudaMalloc");
    check(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  /// `count` elements, uninitialised (scratch).
  explicit DeviceArray(size_t count) {
    if (count > 0) check(cudaMalloc(&ptr_, count * sizeof(T)), "cudaMalloc");
  }
  DeviceArray(DeviceArray&& other) noexcept : ptr_(other.ptr_) { other.ptr_ = nullptr; }
  DeviceArray& operator=(DeviceArray&& other) noexcept {
    std::swap(ptr_, other.ptr_);
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (ptr_) cudaFree(ptr_);
  }
  const T* get() const { return ptr_; }
  T* mutable_get() const { return ptr_; }  // device scratch owned by the plan (e.g. the scheduler counter)

 private:
  T* ptr_ = nullptr;
};

/// A CUDA backend without an FP8 kernel (docs/semantics.md §11) refuses a plan asking for one by name.
inline void require_native_precision(const Problem& p, Device kind) {
  detail::require(p.precision == Precision::native, "precision", to_string(p.precision),
                  std::string("native (precision ") + to_string(p.precision) + " is not supported by backend " +
                      to_string(kind) + " yet)");
}

/// The current device's properties; throws tilewise::Error when there is no usable GPU.
cudaDeviceProp require_device(const char* device_name);

/// Device tables of a plan's pattern, uploaded once. Checks for a device first, so that a machine without
/// one gets tilewise::Error("device") rather than a CUDA runtime error from the first allocation.
struct PatternTables {
  cudaDeviceProp device;
  DeviceArray<HeadParams> heads;
  DeviceArray<int64_t> block_offsets;
  DeviceArray<int32_t> block_tiles;
  DeviceArray<int64_t> query_tile_offsets;  // block lists transposed (Plan::query_tiles), for the backward
  DeviceArray<int32_t> query_tile_list;
  PatternTables(const Plan& plan, Device kind)
      : device(require_device(to_string(kind))),
        heads(plan.pattern().heads),
        block_offsets(plan.pattern().block_offsets),
        block_tiles(plan.pattern().block_tiles),
        query_tile_offsets(plan.query_tile_offsets()),
        query_tile_list(plan.query_tile_list()) {}
};

/// Device memory of a plan's backward workspace, carved in 256-byte aligned pieces.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base_ ? base_ + used_ : nullptr);
    used_ += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

/// Checks that a pointer given to run() is device memory aligned to `alignment` bytes.
void require_device_pointer(const void* p, const char* name, int alignment);

/// Checks every pointer of a run: q, k, v, o aligned to `tensor_alignment` bytes; lse and text_len, when given,
/// to 4 bytes. All on the device.
inline void require_device_tensors(const Tensors& t, int tensor_alignment) {
  require_device_pointer(t.q, "q", tensor_alignment);
  require_device_pointer(t.k, "k", tensor_alignment);
  require_device_pointer(t.v, "v", tensor_alignment);
  require_device_pointer(t.o, "o", tensor_alignment);
  if (t.lse) require_device_pointer(t.lse, "lse", 4);
  if (t.text_len) require_device_pointer(t.text_len, "text_len", 4);
}

/// Checks every pointer of a backward run, likewise.
inline void require_device_tensors(const GradTensors& t, int tensor_alignment) {
  require_device_pointer(t.q, "q", tensor_alignment);
  require_device_pointer(t.k, "k", tensor_alignment);
  require_device_pointer(t.v, "v", tensor_alignment);
  require_device_pointer(t.o, "o", tensor_alignment);
  require_device_pointer(t.dout, "dout", tensor_alignment);
  require_device_pointer(t.dq, "dq", tensor_alignment);
  require_device_pointer(t.dk, "dk", tensor_alignment);
  require_device_pointer(t.dv, "dv", tensor_alignment);
  require_device_pointer(t.lse, "lse", 4);
  if (t.dlse) require_device_pointer(t.dlse, "dlse", 4);
  if (t.text_len) require_device_pointer(t.text_len, "text_len", 4);
}

}  // namespace tilewise::cuda
