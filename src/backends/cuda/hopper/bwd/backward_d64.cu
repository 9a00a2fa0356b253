// The Hopper backward kernels at head dim 64 (backward_at.hpp says why one translation unit per head dim).
#include "backends/cuda/hopper/bwd/backward_launch.cuh"

TILEWISE_BACKWARD_AT(64)
