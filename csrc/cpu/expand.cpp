// CPU kernel of loracuda.expand_add_: y[:, off[i]:off[i+1]] += scale * h[:, i*r:(i+1)*r] @
// lora_b[off[i]:off[i+1]]^T, in place, for each of the S slices.
//
// float32 / float64 y: one BLAS addmm_ per slice straight into y's column slice (beta = 1,
// alpha = scale fuse the scale and the add). bf16 / fp16 y: y is walked in row blocks that fit in L2;
// each block is widened to float32, receives the addmm_ of every slice, and is rounded back once.
#include <torch/library.h>

#include "checks.h"
#include "cpu/common.h"

namespace loracuda {
namespace cpu {
namespace {

void expand_add_(Tensor& y, const Tensor& h, const Tensor& lora_b, double scale, at::IntArrayRef slice_offsets) {
  const std::vector<int64_t> off = check_expand_add_args(y, h, lora_b, scale, slice_offsets);
  // The ATen calls below are this kernel's internals: keep them out of autograd (the op's formula
  // is registered separately) even when the op is reached by a redispatch without a guard.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t m = y.size(0), n = y.size(1), r = lora_b.size(1);
  const int64_t slices = static_cast<int64_t>(off.size()) - 1;
  if (m == 0) return;
  const at::ScalarType acc = accumulate_dtype(y.scalar_type());
  const Tensor b = adapter_as(lora_b, acc);  // [N, r]

  if (y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble) {
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t n0 = off[s], ns = off[s + 1] - off[s];
      y.narrow(1, n0, ns).addmm_(h.narrow(1, s * r, r), b.narrow(0, n0, ns).t(), 1.0, scale);
    }
    return;
  }

  dispatch_value_type(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
      T* yp = y.data_ptr<T>();
      const int64_t rs = row_stride(y), cs = col_stride(y);
      const int64_t bm = block_rows(n, sizeof(float));
      const int64_t blocks = (m + bm - 1) / bm;
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
        std::vector<float> buf(static_cast<size_t>(bm * n));
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t m0 = blk * bm, mb = std::min(bm, m - m0);
          for (int64_t i = 0; i < mb; ++i) load_row(yp + (m0 + i) * rs, cs, n, buf.data() + i * n);
          const Tensor yb = at::from_blob(buf.data(), {mb, n}, y.options().dtype(at::kFloat));
          const Tensor hb = h.narrow(0, m0, mb);
          for (int64_t s = 0; s < slices; ++s) {
            const int64_t n0 = off[s], ns = off[s + 1] - off[s];
            yb.narrow(1, n0, ns).addmm_(hb.narrow(1, s * r, r), b.narrow(0, n0, ns).t(), 1.0, scale);
          }
          for (int64_t i = 0; i < mb; ++i) store_row<T>(buf.data() + i * n, n, yp + (m0 + i) * rs, cs);
        }
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, CPU, m) { m.impl("expand_add_", &expand_add_); }

}  // namespace cpu
}  // namespace loracuda
