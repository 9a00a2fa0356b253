// See cuda_shared_leftovers.cu.
#pragma once

#include <cstdint>

namespace tilewise_test {

/// Queues on `stream` (a cudaStream_t; null: the default stream) a kernel that fills the shared memory of every SM
/// with `pattern`. Throws on a CUDA error.
void fill_shared_memory(uint32_t pattern, void* stream = nullptr);

}  // namespace tilewise_test
