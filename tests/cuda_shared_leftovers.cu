// Shared memory left behind by an earlier kernel, for the backward's regression test
// (test_cuda_backward.cpp, CudaBackwardLeftovers): fills every SM's shared memory with a bit pattern, so that a
// kernel that reads shared memory it never wrote sees that pattern instead of whatever happened to be there. CUDA
// does not clear shared memory between kernels (it does not promise to keep it either: the test is as strong as
// the hardware makes it).
#include "cuda_shared_leftovers.hpp"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace tilewise_test {
namespace {

__global__ void fill_shared(uint32_t pattern, int words) {
  extern __shared__ uint32_t shared_words[];
  for (int i = threadIdx.x; i < words; i += blockDim.x) shared_words[i] = pattern;
  __syncthreads();
  // Keep the stores: a block that wrote shared memory nobody reads could have them dropped.
  if (threadIdx.x == 0 && shared_words[words - 1] != pattern) __trap();
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace

void fill_shared_memory(uint32_t pattern, void* stream) {
  int device = 0, sms = 0, bytes = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "shared memory per block");
  check(cudaFuncSetAttribute(fill_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "fill_shared size");
  // One block per SM at a time (each takes all of an SM's shared memory), four waves so that every SM has one.
  fill_shared<<<4 * sms, 1024, bytes, static_cast<cudaStream_t>(stream)>>>(pattern, bytes / 4);
  check(cudaGetLastError(), "fill_shared launch");
}

}  // namespace tilewise_test
