// CHECK(call): the standalone probes' CUDA error check (scripts/l2_probe.cu, scripts/tma_probe.cuh,
// scripts/mufu_tensor_probe.cu): prints where and which call failed, with CUDA's message, and exits.
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                                      \
  do {                                                                                                \
    cudaError_t e_ = (x);                                                                             \
    if (e_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));        \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)
