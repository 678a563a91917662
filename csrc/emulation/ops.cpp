// The emulated CUDA ops as a Python module (torch extension, built by tests/emulation_build.py): the
// real csrc/cuda/bindings.cpp (argument checks, parameter filling, outputs and workspaces) compiled for
// host tensors, its launchers forwarded to an emulated kernel library loaded at run time
// (kernel_library.h), and a CPU allocator that puts every allocation in front of a no-access page.
#include <dlfcn.h>
#include <sys/mman.h>
#include <torch/extension.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <string>

#include <ATen/cuda/CUDAContext.h>  // the emulation's stand-in (csrc/emulation/include)

#include "kernel_library.h"

namespace loracuda_emulation {
namespace {

const LoracudaEmulatedKernels* g_kernels = nullptr;
at::cuda::EmulatedDeviceProperties g_properties{132};

const LoracudaEmulatedKernels& kernels() {
  TORCH_CHECK(g_kernels != nullptr, "loracuda emulation: no kernel library loaded (call load_kernels first)");
  return *g_kernels;
}

// ---- guard-page allocations --------------------------------------------------------------------------

constexpr size_t kPage = 4096;

struct Mapping {
  void* base;
  size_t bytes;
};

void release_mapping(void* ctx) {
  Mapping* m = static_cast<Mapping*>(ctx);
  munmap(m->base, m->bytes);
  delete m;
}

// n bytes ending 0 to 15 bytes before a no-access page (the data 16-byte aligned); every other byte of
// the mapping, and the data itself, filled with 0xFF: NaN in every floating dtype, so a read of
// uninitialised or out-of-view memory shows in the results and a read past the end faults.
struct GuardAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t data = (n + 15) & ~size_t(15);
    const size_t pages = (data + kPage - 1) / kPage;
    const size_t bytes = (pages + 1) * kPage;
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "loracuda emulation: mmap of ", bytes, " bytes failed");
    unsigned char* guard = static_cast<unsigned char*>(base) + pages * kPage;
    TORCH_CHECK(mprotect(guard, kPage, PROT_NONE) == 0, "loracuda emulation: mprotect failed");
    std::memset(base, 0xFF, pages * kPage);
    void* ptr = guard - data;
    return {ptr, new Mapping{base, bytes}, &release_mapping, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

GuardAllocator g_guard_allocator;
c10::Allocator* g_previous_allocator = nullptr;

void guarded_allocation(bool on) {
  if (on && g_previous_allocator == nullptr) {
    g_previous_allocator = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_guard_allocator, /*priority=*/255);
  } else if (!on && g_previous_allocator != nullptr) {
    c10::SetCPUAllocator(g_previous_allocator, /*priority=*/255);
    g_previous_allocator = nullptr;
  }
}

}  // namespace

void check_launch(cudaError_t err, const char* expression) {
  if (err == cudaSuccess) return;
  const char* message = g_kernels ? g_kernels->last_message() : "";
  TORCH_CHECK(false, expression, " failed (error ", static_cast<int>(err), "): ",
              message && *message ? message : "invalid launch arguments");
}

}  // namespace loracuda_emulation

at::cuda::EmulatedDeviceProperties* at::cuda::getCurrentDeviceProperties() {
  return &loracuda_emulation::g_properties;
}

// The launchers of csrc/cuda/params.h, forwarded to the loaded library.
namespace loracuda {
namespace cuda {
using loracuda_emulation::kernels;
int64_t shrink_workspace_floats(const ShrinkParams& p) { return kernels().shrink_workspace_floats(p); }
cudaError_t launch_shrink(const ShrinkParams& p) { return kernels().launch_shrink(p); }
cudaError_t launch_expand_add(const ExpandParams& p) { return kernels().launch_expand_add(p); }
cudaError_t launch_merge(const MergeParams& p) { return kernels().launch_merge(p); }
int64_t backward_workspace_floats(const BackwardParams& p) { return kernels().backward_workspace_floats(p); }
cudaError_t launch_backward(const BackwardParams& p) { return kernels().launch_backward(p); }
int64_t multi_shrink_workspace_floats(const MultiShrinkParams& p) { return kernels().multi_shrink_workspace_floats(p); }
cudaError_t launch_multi_shrink(const MultiShrinkParams& p) { return kernels().launch_multi_shrink(p); }
cudaError_t launch_multi_expand_add(const MultiExpandParams& p) { return kernels().launch_multi_expand_add(p); }
cudaError_t launch_grouped_row_shrink(const GroupedRowShrinkParams& p) { return kernels().launch_grouped_row_shrink(p); }
cudaError_t launch_grouped_row_expand(const GroupedRowExpandParams& p) { return kernels().launch_grouped_row_expand(p); }
cudaError_t launch_grouped_mm(const GroupedMmParams& p) { return kernels().launch_grouped_mm(p); }
cudaError_t launch_grouped_reduce(const GroupedReduceParams& p) { return kernels().launch_grouped_reduce(p); }
}  // namespace cuda
}  // namespace loracuda

#include "../cuda/bindings.cpp"

namespace {

void load_kernels(const std::string& path) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "loracuda emulation: cannot load ", path, ": ", dlerror());
  using Entry = const LoracudaEmulatedKernels* (*)();
  auto entry = reinterpret_cast<Entry>(dlsym(handle, "loracuda_emulated_kernels"));
  TORCH_CHECK(entry != nullptr, "loracuda emulation: ", path, " has no loracuda_emulated_kernels");
  const LoracudaEmulatedKernels* table = entry();
  TORCH_CHECK(table->version == kLoracudaEmulatedKernelsVersion, "loracuda emulation: ", path,
              " is a kernel library of another version");
  loracuda_emulation::g_kernels = table;
}

at::Tensor mma_check(bool fp16, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  TORCH_CHECK(a.scalar_type() == at::kShort && a.numel() == 256 && a.is_contiguous(), "a: 256 int16 bit patterns");
  TORCH_CHECK(b.scalar_type() == at::kShort && b.numel() == 128 && b.is_contiguous(), "b: 128 int16 bit patterns");
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.numel() == 128 && c.is_contiguous(), "c: 128 float32");
  at::Tensor d = at::empty({16, 8}, c.options());
  loracuda_emulation::check_launch(
      loracuda_emulation::kernels().mma_check(fp16 ? 1 : 0, reinterpret_cast<const uint16_t*>(a.data_ptr()),
                                              reinterpret_cast<const uint16_t*>(b.data_ptr()), c.data_ptr<float>(),
                                              d.data_ptr<float>()),
      "mma_check");
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loracuda's CUDA ops with the kernels run by the host emulation (tests only)";
  m.def("load_kernels", &load_kernels, "use the emulated kernel library at this path");
  m.def("set_schedule", [](int block_order, int thread_order, uint64_t seed) {
    loracuda_emulation::kernels().set_schedule(block_order, thread_order, seed);
  });
  m.def("set_num_sms", [](int n) { loracuda_emulation::g_properties.multiProcessorCount = n; });
  m.def("guarded_allocation", &loracuda_emulation::guarded_allocation,
        "route CPU allocations to guard-page buffers (True) or back to the default allocator (False)");
  m.def("last_message", [] { return std::string(loracuda_emulation::kernels().last_message()); });
  m.def("mma_check", &mma_check);
  m.def("shrink", &loracuda::shrink_cuda);
  m.def("expand_add_", &loracuda::expand_add_cuda);
  m.def("merge_", &loracuda::merge_cuda);
  m.def("restore_codes", &loracuda::restore_codes_cuda);
  m.def("unmerge_exact_", &loracuda::unmerge_exact_cuda);
  m.def("merge_exact_", &loracuda::merge_exact_cuda);
  m.def("backward", &loracuda::backward_cuda);
  m.def("multi_shrink", &loracuda::multi_shrink_cuda);
  m.def("multi_expand_add_", &loracuda::multi_expand_add_cuda);
  m.def("grouped_shrink", &loracuda::grouped_shrink_cuda);
  m.def("grouped_expand_add_", &loracuda::grouped_expand_add_cuda);
  m.def("grouped_backward", &loracuda::grouped_backward_cuda);
  m.def("grouped_mm", &loracuda::grouped_mm_cuda);
  m.def("grouped_weight_grad", &loracuda::grouped_weight_grad_cuda);
}
