// Memory on a plan's device and synchronisation, for the CLI. CPU buffers are host memory; CUDA buffers use
// the CUDA runtime, which the CLI sees only in CUDA builds (TILEWISE_WITH_CUDA comes with tilewise_lib, and
// so do the include paths of CUDA::cudart_static).
#pragma once

#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "tilewise/tilewise.hpp"

#if defined(TILEWISE_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace tilewise::cli {

#if defined(TILEWISE_WITH_CUDA)
inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
#endif

[[noreturn]] inline void no_cuda() {
  throw Error("--device", "cuda", "cpu: this tilewise CLI was built without CUDA");
}

/// Waits for the device's queued work; plan.run on CUDA devices returns before the kernel finishes.
inline void synchronize(Device device) {
  if (device == Device::cpu) return;
#if defined(TILEWISE_WITH_CUDA)
  cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#else
  no_cuda();
#endif
}

/// A byte buffer on one device. Move-only, freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer(Device device, size_t bytes) : device_(device), bytes_(bytes) {
    if (device_ == Device::cpu) {
      host_.resize(bytes);
      return;
    }
#if defined(TILEWISE_WITH_CUDA)
    cuda_check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
#else
    no_cuda();
#endif
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : device_(o.device_), bytes_(o.bytes_), host_(std::move(o.host_)), ptr_(o.ptr_) {
    o.ptr_ = nullptr;
  }
  ~DeviceBuffer() {
#if defined(TILEWISE_WITH_CUDA)
    if (ptr_) cudaFree(ptr_);
#endif
  }

  void* data() { return device_ == Device::cpu ? static_cast<void*>(host_.data()) : ptr_; }
  size_t size() const { return bytes_; }

  void upload(const void* src) {
    if (device_ == Device::cpu) return void(std::memcpy(host_.data(), src, bytes_));
#if defined(TILEWISE_WITH_CUDA)
    cuda_check(cudaMemcpy(ptr_, src, bytes_, cudaMemcpyHostToDevice), "cudaMemcpy to device");
#endif
  }
  std::vector<std::byte> download() {
    if (device_ == Device::cpu) return host_;
    std::vector<std::byte> out(bytes_);
#if defined(TILEWISE_WITH_CUDA)
    cuda_check(cudaMemcpy(out.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
#endif
    return out;
  }
  /// Every byte 0xff: a NaN in every float type, so elements a backend never writes show up as NaN.
  void poison() {
    if (device_ == Device::cpu) return void(std::memset(host_.data(), 0xff, bytes_));
#if defined(TILEWISE_WITH_CUDA)
    cuda_check(cudaMemset(ptr_, 0xff, bytes_), "cudaMemset");
#endif
  }

 private:
  Device device_;
  size_t bytes_;
  std::vector<std::byte> host_;
  void* ptr_ = nullptr;
};

}  // namespace tilewise::cli
