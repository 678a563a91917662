// The CUDA device API as the loracuda kernels use it, for a host build of the real kernel sources
// (csrc/cuda/*.cu compiled by the C++ compiler, see tests/emulation_build.py). Every CUDA thread of a
// block runs as a fiber (csrc/emulation/runtime.cpp); barriers, warp collectives and shared-memory
// accesses go through the runtime, which checks them:
//   - __syncthreads / __syncthreads_and release when every live thread of the block arrives at the
//     same call site; warp collectives (__shfl_*_sync, votes, the emulated mma.sync) when every lane of
//     the mask arrives at the same call site. Anything else is an error naming the kernel and the lines.
//   - shared memory (LORACUDA_SHARED, shared_load / shared_store) is a per-block arena filled with NaN
//     bytes before every block, sized against the 48 KiB static limit, and race-checked between
//     barriers (a word written by one thread and read or written by another).
//   - 16-byte vector accesses (__ldg of float4 / uint4, load_vec16 / store_vec16) must be 16-byte
//     aligned, as on the GPU.
// What it does not model: timing, the memory model beyond barriers (no reordering, no caches), the
// tensor cores' internal accumulation order beyond "float32 sums in k order", launch limits other than
// the block size and shared memory.
#pragma once
#define LORACUDA_EMULATION 1
// The tensor-core instruction is emulated from its PTX fragment layout (csrc/emulation/mma_emulation.h),
// chosen explicitly: mma.cuh's non-tensor-core shuffle fallback is not what the host build runs.
#ifndef LORACUDA_MMA_EMULATION
#define LORACUDA_MMA_EMULATION 1
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ------------------------------------------------------------------------------------
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __shared__ is deliberately left undefined: shared memory is declared through LORACUDA_SHARED.

// ---- runtime types ---------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- 16-bit floating point -------------------------------------------------------------------------
struct __nv_bfloat16 {
  unsigned short bits;
};
struct __half {
  unsigned short bits;
};

inline uint32_t __float_as_uint(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline float __bfloat162float(__nv_bfloat16 v) { return __uint_as_float(static_cast<uint32_t>(v.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  const uint32_t u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};  // NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{static_cast<unsigned short>(rounded >> 16)};
}
inline float __half2float(__half v) {
  const uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
  const float mag = std::ldexp(static_cast<float>(man), -24);  // subnormal (exact)
  return sign ? -mag : mag;
}
inline __half __float2half_rn(float v) {
  const uint32_t u = __float_as_uint(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return __half{static_cast<unsigned short>(sign | 0x7e00u)};  // NaN
  if (mag >= 0x477ff000u) return __half{static_cast<unsigned short>(sign | 0x7c00u)};  // rounds to inf
  if (mag < 0x38800000u) {  // below the smallest normal half: a multiple of 2^-24, rounded to even
    const float a = __uint_as_float(mag);
    const float q = std::nearbyint(a * 16777216.0f);  // exact scaling; nearbyint rounds ties to even
    return __half{static_cast<unsigned short>(sign | static_cast<uint32_t>(q))};
  }
  const uint32_t rounded = mag + 0xfffu + ((mag >> 13) & 1u);
  return __half{static_cast<unsigned short>(sign | ((rounded - 0x38000000u) >> 13))};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.bits; }
inline unsigned short __half_as_ushort(__half v) { return v.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }

// Correctly rounded float32 operations (the host build compiles with -ffp-contract=off, so nothing
// else is fused either).
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
using std::fmaf;

// ---- the runtime (csrc/emulation/runtime.cpp) --------------------------------------------------------
namespace loracuda_emu {

extern uint3 thread_idx;
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;

struct Site {
  const char* file;
  int line;
};

void syncthreads(Site site);
int syncthreads_and(int pred, Site site);
// Every lane of `mask` deposits `bytes` (<= 64) bytes; returns the 32 lanes' deposits (64 bytes
// apart), valid until the calling lane's next collective.
const unsigned char* warp_collective(unsigned mask, const void* mine, size_t bytes, const char* what, Site site);
void syncwarp(unsigned mask, Site site);

void check_vector_access(const void* p, const char* what, Site site);
void* shared_array(size_t bytes, const char* name, Site site);
void shared_access(const void* p, size_t bytes, bool write, Site site);
[[noreturn]] void kernel_error(const char* message, Site site);

cudaError_t launch(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* context);
cudaError_t get_last_error();

template <typename T>
inline T shfl_from(unsigned mask, T v, int src_kind, int arg, const char* what, Site site) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move 4 or 8 bytes");
  const unsigned char* all = warp_collective(mask, &v, sizeof(T), what, site);
  const int lane = static_cast<int>(thread_idx.x & 31u);  // 1-D blocks (the kernels launch only those)
  int src = src_kind == 0 ? arg : (lane ^ arg);
  src &= 31;
  if (!((mask >> src) & 1u)) kernel_error("shuffle reads a lane outside the mask", site);
  T out;
  std::memcpy(&out, all + 64 * src, sizeof(T));
  return out;
}

inline unsigned ballot(unsigned mask, int pred, const char* what, Site site) {
  const int mine = pred != 0;
  const unsigned char* all = warp_collective(mask, &mine, sizeof(int), what, site);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) {
    int v;
    std::memcpy(&v, all + 64 * l, sizeof(int));
    if (((mask >> l) & 1u) && v) bits |= 1u << l;
  }
  return bits;
}

// __popc: the number of set bits (a plain function on the host, as on the device).
inline int popc(unsigned v) { return __builtin_popcount(v); }

template <typename V>
inline V ldg(const V* p, Site site) {
  if constexpr (sizeof(V) == 16) check_vector_access(p, "__ldg of 16 bytes", site);
  return *p;
}

}  // namespace loracuda_emu

#define threadIdx (::loracuda_emu::thread_idx)
#define blockIdx (::loracuda_emu::block_idx)
#define blockDim (::loracuda_emu::block_dim)
#define gridDim (::loracuda_emu::grid_dim)
#define LORACUDA_EMU_SITE (::loracuda_emu::Site{__FILE__, __LINE__})

#define __syncthreads() ::loracuda_emu::syncthreads(LORACUDA_EMU_SITE)
#define __popc(v) ::loracuda_emu::popc(v)
#define __syncthreads_and(pred) ::loracuda_emu::syncthreads_and((pred), LORACUDA_EMU_SITE)
#define __syncwarp(mask) ::loracuda_emu::syncwarp((mask), LORACUDA_EMU_SITE)
#define __shfl_sync(mask, v, src) ::loracuda_emu::shfl_from((mask), (v), 0, (src), "__shfl_sync", LORACUDA_EMU_SITE)
#define __shfl_xor_sync(mask, v, lm) ::loracuda_emu::shfl_from((mask), (v), 1, (lm), "__shfl_xor_sync", LORACUDA_EMU_SITE)
#define __ballot_sync(mask, pred) ::loracuda_emu::ballot((mask), (pred), "__ballot_sync", LORACUDA_EMU_SITE)
#define __all_sync(mask, pred) \
  (::loracuda_emu::ballot((mask), (pred), "__all_sync", LORACUDA_EMU_SITE) == (mask))
#define __any_sync(mask, pred) (::loracuda_emu::ballot((mask), (pred), "__any_sync", LORACUDA_EMU_SITE) != 0u)
#define __ldg(p) ::loracuda_emu::ldg((p), LORACUDA_EMU_SITE)

// ---- the accessor layer of csrc/cuda/device_api.cuh, checked -------------------------------------------
#define LORACUDA_SHARED(type, name, count)                                                                   \
  type* const name = static_cast<type*>(::loracuda_emu::shared_array(sizeof(type) * static_cast<size_t>(count), \
                                                                    #name, LORACUDA_EMU_SITE))

namespace loracuda_emu {
template <typename T>
inline T shared_load_at(const T* p, Site site) {
  shared_access(p, sizeof(T), false, site);
  return *p;
}
template <typename T, typename U>
inline void shared_store_at(T* p, U v, Site site) {
  shared_access(p, sizeof(T), true, site);
  *p = static_cast<T>(v);
}
inline float4 shared_load_float4_at(const float* p, Site site) {
  check_vector_access(p, "16-byte shared-memory load", site);
  shared_access(p, 16, false, site);
  float4 v;
  std::memcpy(&v, p, 16);
  return v;
}
template <typename V>
inline V load_vec16_at(const void* p, Site site) {
  static_assert(sizeof(V) == 16, "16-byte vectors only");
  check_vector_access(p, "16-byte load", site);
  V v;
  std::memcpy(&v, p, 16);
  return v;
}
template <typename V>
inline void store_vec16_at(void* p, const V& v, Site site) {
  static_assert(sizeof(V) == 16, "16-byte vectors only");
  check_vector_access(p, "16-byte store", site);
  std::memcpy(p, &v, 16);
}

// The kernel launch: every thread of every block calls `kernel(args...)` with its own copy of the
// arguments, converted to the kernel's parameter types as a launch does.
template <typename... Params, typename... Args>
inline cudaError_t launch_kernel_at(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block,
                                    Args&&... args) {
  using Tuple = std::tuple<std::decay_t<Params>...>;
  struct Context {
    void (*kernel)(Params...);
    Tuple args;
  } context{kernel, Tuple(std::forward<Args>(args)...)};
  const auto body = [](void* c) {
    Context* ctx = static_cast<Context*>(c);
    std::apply([ctx](const auto&... a) { ctx->kernel(a...); }, ctx->args);
  };
  return launch(name, grid, block, body, &context);
}
}  // namespace loracuda_emu

#define shared_load(p) ::loracuda_emu::shared_load_at((p), LORACUDA_EMU_SITE)
#define shared_store(p, v) ::loracuda_emu::shared_store_at((p), (v), LORACUDA_EMU_SITE)
#define shared_load_float4(p) ::loracuda_emu::shared_load_float4_at((p), LORACUDA_EMU_SITE)
#define load_vec16(V, p) ::loracuda_emu::load_vec16_at<V>((p), LORACUDA_EMU_SITE)
#define store_vec16(p, v) ::loracuda_emu::store_vec16_at((p), (v), LORACUDA_EMU_SITE)

inline cudaError_t cudaGetLastError() { return ::loracuda_emu::get_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated kernel error"; }
