// Host build of csrc/cuda/bindings.cpp (csrc/emulation/ops.cpp): the two facts bindings.cpp asks of
// the CUDA context, the SM count (settable, so split-K plans can be exercised) and the stream (none).
#pragma once
#include <cuda_runtime.h>

namespace at {
namespace cuda {
struct EmulatedDeviceProperties {
  int multiProcessorCount;
};
EmulatedDeviceProperties* getCurrentDeviceProperties();  // csrc/emulation/ops.cpp
struct EmulatedStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream() { return EmulatedStream{}; }
}  // namespace cuda
}  // namespace at
