// CPU kernel of loracuda.shrink: h [M, R] = (mask * x / (1 - p)) @ lora_a^T, accumulated in float32
// (float64 for float64 x).
//
// float32 / float64 x without dropout is one BLAS GEMM on x as it is (any strides). Every other case
// (bf16 / fp16 x, or dropout) walks x in row blocks that fit in L2: each block is converted to the
// accumulation type, masked and scaled when dropout is on, and fed to a GEMM that writes its rows of
// h. No M x K temporary is built, and x is read once.
#include <torch/library.h>

#include "checks.h"
#include "cpu/common.h"

namespace loracuda {
namespace cpu {
namespace {

Tensor shrink(const Tensor& x, const Tensor& lora_a, double dropout_p, const std::optional<Tensor>& seed) {
  check_shrink_args(x, lora_a, dropout_p, seed);
  // The ATen calls below are this kernel's internals: keep them out of autograd (the op's formula
  // is registered separately) even when the op is reached by a redispatch without a guard.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const Dropout drop = make_dropout(dropout_p, seed);
  const Tensor a_t = adapter_as(lora_a, acc).t();  // [K, R]
  const bool wide = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  if (!drop.active && wide) return at::mm(x, a_t);

  const int64_t m = x.size(0), k = x.size(1), r = lora_a.size(0);
  Tensor h = at::empty({m, r}, x.options().dtype(acc));
  if (m == 0) return h;
  dispatch_value_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* xp = x.const_data_ptr<T>();
    const int64_t rs = row_stride(x), cs = col_stride(x);
    const int64_t bm = block_rows(k, sizeof(A));
    const int64_t blocks = (m + bm - 1) / bm;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
      std::vector<A> buf(static_cast<size_t>(bm * k));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = blk * bm, mb = std::min(bm, m - m0);
        for (int64_t i = 0; i < mb; ++i) {
          A* row = buf.data() + i * k;
          if (drop.active) {
            load_dropped_row(drop, static_cast<uint64_t>(m0 + i) * static_cast<uint64_t>(k), xp + (m0 + i) * rs, cs, k,
                             row, nullptr);
          } else {
            load_row(xp + (m0 + i) * rs, cs, k, row);
          }
        }
        const Tensor xb = at::from_blob(buf.data(), {mb, k}, x.options().dtype(acc));
        Tensor hb = h.narrow(0, m0, mb);
        at::mm_out(hb, xb, a_t);
      }
    });
  });
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, CPU, m) { m.impl("shrink", &shrink); }

}  // namespace cpu
}  // namespace loracuda
