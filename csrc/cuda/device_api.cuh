// The device API the kernels use, in one place: the CUDA headers, kernel launches, shared memory and
// 16-byte vector accesses. On the GPU these are the plain CUDA constructs; in the host build of the
// kernels (LORACUDA_EMULATION, csrc/emulation/cuda_emulation.h) the same names run through a checking
// emulation: launches run every thread as a fiber, shared memory is a poisoned, race-checked arena and
// vector accesses must be 16-byte aligned. Kernels therefore
//   - launch with launch_kernel(LORACUDA_KERNEL(kernel<...>), grid, block, stream, args...), never <<<>>>;
//   - declare shared memory with LORACUDA_SHARED(type, name, count) and touch it only through
//     shared_load(p), shared_store(p, v) and shared_load_float4(p);
//   - read or write 16 bytes of global memory through load_vec16(V, p) / store_vec16(p, v) or __ldg.
// CUDA headers only (no torch).
#pragma once

#if defined(LORACUDA_EMULATION)
#include "../emulation/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <utility>

namespace loracuda {
namespace cuda {

// A kernel and its name (the name is what the emulation reports in its errors).
template <typename F>
struct NamedKernel {
  F fn;
  const char* name;
};
#define LORACUDA_KERNEL(...) (::loracuda::cuda::NamedKernel<decltype(&__VA_ARGS__)>{&__VA_ARGS__, #__VA_ARGS__})

#if defined(LORACUDA_EMULATION)

template <typename... Params, typename... Args>
inline cudaError_t launch_kernel(NamedKernel<void (*)(Params...)> kernel, dim3 grid, dim3 block, cudaStream_t,
                                 Args&&... args) {
  return ::loracuda_emu::launch_kernel_at(kernel.fn, kernel.name, grid, block, std::forward<Args>(args)...);
}

#else

// Launches `kernel` on `stream` without dynamic shared memory; returns cudaGetLastError().
template <typename... Params, typename... Args>
inline cudaError_t launch_kernel(NamedKernel<void (*)(Params...)> kernel, dim3 grid, dim3 block, cudaStream_t stream,
                                 Args&&... args) {
  kernel.fn<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

#define LORACUDA_SHARED(type, name, count) __shared__ __align__(16) type name[count]

template <typename T>
__device__ __forceinline__ T shared_load(const T* p) {
  return *p;
}
template <typename T, typename U>
__device__ __forceinline__ void shared_store(T* p, U v) {
  *p = v;
}
__device__ __forceinline__ float4 shared_load_float4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// 16 bytes at p (16-byte aligned) as a V (float4 or uint4), and the store of one.
#define load_vec16(V, p) (*reinterpret_cast<const V*>(p))
#define store_vec16(p, v) (*(p) = (v))

#endif

}  // namespace cuda
}  // namespace loracuda
