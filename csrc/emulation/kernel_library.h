// The table of the emulated kernel library (kernel_library.cpp), shared with the torch extension
// (ops.cpp) that loads it.
#pragma once
#include "../cuda/params.h"

constexpr int kLoracudaEmulatedKernelsVersion = 2;

struct LoracudaEmulatedKernels {
  int version;
  int64_t (*shrink_workspace_floats)(const loracuda::cuda::ShrinkParams&);
  cudaError_t (*launch_shrink)(const loracuda::cuda::ShrinkParams&);
  cudaError_t (*launch_expand_add)(const loracuda::cuda::ExpandParams&);
  cudaError_t (*launch_merge)(const loracuda::cuda::MergeParams&);
  int64_t (*backward_workspace_floats)(const loracuda::cuda::BackwardParams&);
  cudaError_t (*launch_backward)(const loracuda::cuda::BackwardParams&);
  int64_t (*multi_shrink_workspace_floats)(const loracuda::cuda::MultiShrinkParams&);
  cudaError_t (*launch_multi_shrink)(const loracuda::cuda::MultiShrinkParams&);
  cudaError_t (*launch_multi_expand_add)(const loracuda::cuda::MultiExpandParams&);
  cudaError_t (*launch_grouped_row_shrink)(const loracuda::cuda::GroupedRowShrinkParams&);
  cudaError_t (*launch_grouped_row_expand)(const loracuda::cuda::GroupedRowExpandParams&);
  cudaError_t (*launch_grouped_mm)(const loracuda::cuda::GroupedMmParams&);
  cudaError_t (*launch_grouped_reduce)(const loracuda::cuda::GroupedReduceParams&);
  // One warp: D [16 x 8] = A [16 x 16] B [16 x 8] + C through mma.cuh's mma_m16n8k16 (16-bit bits, fp16 or bf16).
  cudaError_t (*mma_check)(int fp16, const uint16_t* a, const uint16_t* b, const float* c, float* d);
  // block / thread order: 0 forward, 1 reversed, 2 random (seeded).
  void (*set_schedule)(int block_order, int thread_order, uint64_t seed);
  const char* (*last_message)();
  void (*clear_message)();
};

extern "C" const LoracudaEmulatedKernels* loracuda_emulated_kernels();
