// The Hopper backward kernels at head dim 96 (backward_at.hpp says why one translation unit per head dim).
// CMakeLists.txt compiles this file with ptxas's register usage level 2 (docs/performance.md backward v3.32).
#include "backends/cuda/hopper/bwd/backward_launch.cuh"

TILEWISE_BACKWARD_AT(96)
