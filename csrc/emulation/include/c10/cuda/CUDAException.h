// Host build of csrc/cuda/bindings.cpp: a failed emulated launch raises with the emulation's message.
#pragma once
#include <cuda_runtime.h>

namespace loracuda_emulation {
void check_launch(cudaError_t err, const char* expression);  // csrc/emulation/ops.cpp
}
#define C10_CUDA_CHECK(EXPR) ::loracuda_emulation::check_launch((EXPR), #EXPR)
