// The C entry point of the emulated kernel library (libloracuda_emulated_kernels*.so, built by
// tests/emulation_build.py from csrc/cuda/*.cu, runtime.cpp and this file): a table of the launchers
// of csrc/cuda/params.h and the runtime's controls, looked up by the torch extension (ops.cpp) with
// dlopen / dlsym, so that a library built from other kernel sources (the planted-bug tests) can be
// loaded in its place.
#include "kernel_library.h"

#include "../cuda/common.cuh"

extern "C" void loracuda_emu_set_schedule(int block_order, int thread_order, uint64_t seed);
extern "C" const char* loracuda_emu_last_message();
extern "C" void loracuda_emu_clear_message();

namespace {

using namespace loracuda::cuda;

// One warp runs one mma_m16n8k16 on A [16 x 16] and B [16 x 8] (16-bit bits, row-major) and C
// [16 x 8] float32, loading the fragments by the PTX layout (mma.cuh), writing D [16 x 8].
template <typename T>
__global__ void mma_check_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const auto pair = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
  const uint32_t af[4] = {pair(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                          pair(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                          pair(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                          pair(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  // B (k, n) row-major [16 x 8]: b[0] holds k = 2t, 2t+1 of column g, b[1] k = 2t+8, 2t+9.
  const uint32_t bf[2] = {pair(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                          pair(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  mma_m16n8k16<T>(acc, af, bf);
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

cudaError_t run_mma_check(int fp16, const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  if (fp16) return launch_kernel(LORACUDA_KERNEL(mma_check_kernel<__half>), 1, 32, nullptr, a, b, c, d);
  return launch_kernel(LORACUDA_KERNEL(mma_check_kernel<__nv_bfloat16>), 1, 32, nullptr, a, b, c, d);
}

}  // namespace

extern "C" const LoracudaEmulatedKernels* loracuda_emulated_kernels() {
  static const LoracudaEmulatedKernels table = {
      kLoracudaEmulatedKernelsVersion,
      &shrink_workspace_floats,
      &launch_shrink,
      &launch_expand_add,
      &launch_merge,
      &backward_workspace_floats,
      &launch_backward,
      &multi_shrink_workspace_floats,
      &launch_multi_shrink,
      &launch_multi_expand_add,
      &launch_grouped_row_shrink,
      &launch_grouped_row_expand,
      &launch_grouped_mm,
      &launch_grouped_reduce,
      &run_mma_check,
      &loracuda_emu_set_schedule,
      &loracuda_emu_last_message,
      &loracuda_emu_clear_message,
  };
  return &table;
}
