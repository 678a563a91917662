// CPU kernel of loracuda.backward: the LoRA part of a linear layer's backward
// (docs/design.md, section 'Math and memory passes').
//
//   g      = scale * grad_y[:, slice] @ lora_b[slice]     [M, R]  ┐ the pass over grad_y
//   grad_b = scale * grad_y[:, slice]^T @ h[:, slice]     [N, r]  ┘
//   grad_a = g^T @ (mask * x / q)                         [R, K]  ┐ the pass over x (and grad_x)
//   grad_x += mask * (g @ lora_a) / q                     [M, K]  ┘
//
// float32 grad_y (unit column stride, r <= 64) on an AVX-512 machine takes the grad_y pass in one read
// of grad_y (cpu/grad_y_pass_avx512.h), and float32 x (unit column stride, with or without dropout)
// the x pass in one read of x and one read-modify-write of grad_x (cpu/x_pass_avx512.h). Otherwise
// float32 / float64 values skip a pass's blocking where BLAS can take the tensors as they are: the
// grad_y pass (two BLAS reads of grad_y), and the x pass when there is no dropout. Otherwise (bf16 /
// fp16 values, or dropout in the x pass) the pass walks its M x K (or M x N) operand in row blocks that fit in L2: a block is
// widened to the accumulation type, masked once, and used both for its grad_a (or grad_b) GEMM and for
// its rows of grad_x, so x and grad_x are each read once and no M x K temporary exists. Reductions
// over M are summed per fixed chunk of rows and then chunk by chunk in order (cpu/common.h), so the
// result does not depend on the thread count.
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cpu/common.h"
#include "cpu/grad_y_pass_avx512.h"
#include "cpu/x_pass_avx512.h"

namespace loracuda {
namespace cpu {
namespace {

// Sum of partials [C, ...] over C, in order.
Tensor sum_in_order(const Tensor& partials) {
  Tensor total = partials[0].clone();
  for (int64_t c = 1; c < partials.size(0); ++c) total.add_(partials[c]);
  return total;
}

#ifdef LORACUDA_X86_DISPATCH
// The one-read loop of cpu/grad_y_pass_avx512.h applies on an AVX-512 machine to float32 rows of grad_y
// with unit column stride when h [M, R] (float32) has unit column stride and r <= 64.
bool one_read_loop_applies(const Tensor& h, int64_t r) {
  return detail::isa() == detail::Isa::avx512 && col_stride(h) == 1 && r <= grad_y_avx512::kMaxRank;
}

// float32 grad_y: that loop over fixed chunks of rows; fills g [M, R] and returns grad_b [N, r] =
// scale * (the chunk sums, added in chunk order).
//
// With few row chunks (small M) the columns are split too, into a number of tiles that depends on the
// shapes only: grad_b's rows are each computed in one tile, and g = the tiles' partial sums [M, R],
// added in tile order, so the result does not depend on the thread count.
Tensor grad_y_pass_one_read(const Tensor& grad_y, const Tensor& h, const Tensor& b, double scale,
                            const std::vector<int64_t>& off, Tensor& g) {
  const int64_t m = grad_y.size(0), n = grad_y.size(1), r = b.size(1), big_r = g.size(1);
  const int64_t chunk = reduction_chunk_rows(m, 8, n * r, sizeof(float));
  const int64_t chunks = (m + chunk - 1) / chunk;
  constexpr int64_t kTasks = 4;            // enough for the 2-4 cores of a small machine
  constexpr int64_t kMinTileColumns = 512;  // narrower tiles: more g partials [M, R] to write and sum
  const int64_t tiles = chunks >= kTasks ? 1 : std::clamp<int64_t>(n / kMinTileColumns, 1, (kTasks + chunks - 1) / chunks);
  const int64_t tile_width = (n + tiles - 1) / tiles;
  Tensor partial = at::zeros({chunks, n, r}, grad_y.options());
  Tensor g_tiles = tiles > 1 ? at::empty({tiles, m, big_r}, grad_y.options()) : Tensor();
  const float* dyp = grad_y.const_data_ptr<float>();
  const float* hp = h.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const int64_t rs = row_stride(grad_y), hs = row_stride(h);
  at::parallel_for(0, chunks * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c = task / tiles, t = task % tiles;
      float* gp = tiles > 1 ? g_tiles.data_ptr<float>() + t * m * big_r : g.data_ptr<float>();
      const int64_t gs = tiles > 1 ? big_r : g.stride(0);
      // The slices clipped to this tile's columns (a slice outside it has no columns: its g is 0 here).
      std::vector<int64_t> tile_off(off.size());
      const int64_t c0 = t * tile_width, c1 = std::min(n, c0 + tile_width);
      for (size_t s = 0; s < off.size(); ++s) tile_off[s] = std::clamp(off[s], c0, c1);
      grad_y_avx512::run(dyp, rs, hp, hs, bp, static_cast<int>(r), tiles > 1 ? tile_off : off, c * chunk,
                         std::min(m, (c + 1) * chunk), pp + c * n * r, gp, gs);
    }
  });
  if (tiles > 1) g.copy_(sum_in_order(g_tiles));
  g.mul_(scale);
  return sum_in_order(partial).mul_(scale);
}
#endif

// The grad_y pass for bf16 / fp16 grad_y: fills g [M, R] and returns grad_b [N, r] (accumulation type,
// scale applied). Each row block is widened once into an L2-resident float32 buffer, which the one-read
// loop (AVX-512, r <= 64) or two BLAS GEMMs then use.
template <typename T>
Tensor grad_y_pass_blocked(const Tensor& grad_y, const Tensor& h, const Tensor& b, double scale,
                           const std::vector<int64_t>& off, Tensor& g) {
  const int64_t m = grad_y.size(0), n = grad_y.size(1), r = b.size(1);
  const int64_t slices = static_cast<int64_t>(off.size()) - 1;
  const T* dyp = grad_y.const_data_ptr<T>();
  const int64_t rs = row_stride(grad_y), cs = col_stride(grad_y);
  const int64_t bm = block_rows(n, sizeof(float));
  const int64_t chunk = reduction_chunk_rows(m, bm, n * r, sizeof(float));
  const int64_t chunks = (m + chunk - 1) / chunk;
  const auto fopt = grad_y.options().dtype(at::kFloat);
  Tensor partial = at::zeros({chunks, n, r}, fopt);
#ifdef LORACUDA_X86_DISPATCH
  const bool one_read = one_read_loop_applies(h, r);  // the widened rows are float32 of unit stride
#endif
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
    std::vector<float> buf(static_cast<size_t>(bm * n));
    for (int64_t c = c0; c < c1; ++c) {
      Tensor part = partial[c];
      for (int64_t m0 = c * chunk; m0 < std::min(m, (c + 1) * chunk); m0 += bm) {
        const int64_t mb = std::min(bm, m - m0);
        for (int64_t i = 0; i < mb; ++i) load_row(dyp + (m0 + i) * rs, cs, n, buf.data() + i * n);
        Tensor gb = g.narrow(0, m0, mb);
#ifdef LORACUDA_X86_DISPATCH
        if (one_read) {  // the widened block through the float32 one-read loop
          grad_y_avx512::run(buf.data(), n, h.const_data_ptr<float>() + m0 * row_stride(h), row_stride(h),
                             b.const_data_ptr<float>(), static_cast<int>(r), off, 0, mb, part.data_ptr<float>(),
                             gb.data_ptr<float>(), gb.stride(0));
          gb.mul_(scale);
          continue;
        }
#endif
        const Tensor dyb = at::from_blob(buf.data(), {mb, n}, fopt);
        const Tensor hb = h.narrow(0, m0, mb);
        for (int64_t s = 0; s < slices; ++s) {
          const int64_t n0 = off[s], ns = off[s + 1] - off[s];
          const Tensor dys = dyb.narrow(1, n0, ns);
          gb.narrow(1, s * r, r).copy_(at::mm(dys, b.narrow(0, n0, ns)));
          part.narrow(0, n0, ns).addmm_(dys.t(), hb.narrow(1, s * r, r));
        }
        gb.mul_(scale);
      }
    }
  });
  return sum_in_order(partial).mul_(scale);
}

#ifdef LORACUDA_X86_DISPATCH
// float32 x (and grad_x when given) of unit column stride, with or without dropout, on an AVX-512 machine: the
// one-read loop of cpu/x_pass_avx512.h over fixed chunks of rows adds the LoRA part into grad_x and
// returns grad_a [R, K] = the chunk sums, added in chunk order (the same sums with or without grad_x).
//
// The tasks are (row chunk, column tile) pairs. Every column of grad_a and grad_x is computed from the
// same column of x alone, so the tiling changes no result; it only lets a few row chunks (small M,
// when one chunk takes all the rows) keep every thread busy.
Tensor x_pass_one_read(const Tensor& x, const Tensor& g, const Tensor& a, const Dropout& drop,
                       const std::optional<Tensor>& grad_x) {
  const int64_t m = x.size(0), k = x.size(1), big_r = a.size(0);
  const int64_t chunk = reduction_chunk_rows(m, x_pass_avx512::kGroupRows, big_r * k, sizeof(float));
  const int64_t chunks = (m + chunk - 1) / chunk;
  const int64_t threads = at::get_num_threads();
  constexpr int64_t kMinTileColumns = 256;  // 1 KiB of each row: a task still streams whole lines
  const int64_t tiles = chunks >= 2 * threads ? 1
                                              : std::clamp<int64_t>(k / kMinTileColumns, 1, (2 * threads + chunks - 1) / chunks);
  const int64_t tile_width = ((k + tiles - 1) / tiles + 15) / 16 * 16;  // whole 16-column vectors
  Tensor partial = at::zeros({chunks, big_r, k}, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* gxp = grad_x.has_value() ? grad_x->data_ptr<float>() : nullptr;
  const float* gp = g.const_data_ptr<float>();
  const float* ap = a.const_data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const int64_t xs = row_stride(x), gxs = grad_x.has_value() ? row_stride(*grad_x) : 0, gs = g.stride(0);
  at::parallel_for(0, chunks * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c = task / tiles, k0 = task % tiles * tile_width;
      if (k0 >= k) continue;
      const x_pass_avx512::Columns cols{std::min(tile_width, k - k0), k, k, k, k0};
      x_pass_avx512::rows(xp + k0, xs, gxp != nullptr ? gxp + k0 : nullptr, gxs, gp, gs, ap + k0, big_r, cols,
                          c * chunk, std::min(m, (c + 1) * chunk), pp + c * big_r * k + k0, drop);
    }
  });
  return sum_in_order(partial);
}
#endif

// The x pass in row blocks: returns grad_a [R, K] (accumulation type) and adds the LoRA part into
// grad_x when given.
template <typename T>
Tensor x_pass_blocked(const Tensor& x, const Tensor& g, const Tensor& a, const Dropout& drop,
                      const std::optional<Tensor>& grad_x) {
  using A = acc_t<T>;
  const int64_t m = x.size(0), k = x.size(1), big_r = a.size(0);
  const T* xp = x.const_data_ptr<T>();
  const int64_t xrs = row_stride(x), xcs = col_stride(x);
  T* gxp = grad_x.has_value() ? grad_x->data_ptr<T>() : nullptr;
  const int64_t grs = grad_x.has_value() ? row_stride(*grad_x) : 0;
  const int64_t gcs = grad_x.has_value() ? col_stride(*grad_x) : 0;
  const int64_t bm = block_rows(k, sizeof(A));
  const int64_t chunk = reduction_chunk_rows(m, bm, big_r * k, sizeof(A));
  const int64_t chunks = (m + chunk - 1) / chunk;
  const auto aopt = x.options().dtype(g.scalar_type());
  Tensor partial = at::zeros({chunks, big_r, k}, aopt);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
    std::vector<A> xbuf(static_cast<size_t>(bm * k));
    std::vector<A> gxbuf(gxp ? static_cast<size_t>(bm * k) : 0);
    std::vector<A> gxrow(gxp ? static_cast<size_t>(k) : 0);
    std::vector<uint8_t> keep(drop.active ? static_cast<size_t>(bm * k) : 0);
    for (int64_t c = c0; c < c1; ++c) {
      Tensor part = partial[c];
      for (int64_t m0 = c * chunk; m0 < std::min(m, (c + 1) * chunk); m0 += bm) {
        const int64_t mb = std::min(bm, m - m0);
        for (int64_t i = 0; i < mb; ++i) {
          A* row = xbuf.data() + i * k;
          if (drop.active) {
            load_dropped_row(drop, static_cast<uint64_t>(m0 + i) * static_cast<uint64_t>(k), xp + (m0 + i) * xrs, xcs,
                             k, row, gxp != nullptr ? keep.data() + i * k : nullptr);
          } else {
            load_row(xp + (m0 + i) * xrs, xcs, k, row);
          }
        }
        const Tensor xb = at::from_blob(xbuf.data(), {mb, k}, aopt);
        const Tensor gb = g.narrow(0, m0, mb);
        part.addmm_(gb.t(), xb);
        if (gxp == nullptr) continue;
        Tensor lora = at::from_blob(gxbuf.data(), {mb, k}, aopt);
        at::mm_out(lora, gb, a);
        for (int64_t i = 0; i < mb; ++i) {
          const A* lr = gxbuf.data() + i * k;
          A* acc = gxrow.data();
          T* out = gxp + (m0 + i) * grs;
          if constexpr (std::is_same_v<T, A>) {
            if (drop.active && gcs == 1) {  // float32 / float64 rows: add in place, no widening copy
              add_kept(keep.data() + i * k, drop.keep_scale, k, lr, out);
              continue;
            }
          }
          load_row(out, gcs, k, acc);
          if (drop.active) {
            add_kept(keep.data() + i * k, drop.keep_scale, k, lr, acc);
          } else {
            for (int64_t j = 0; j < k; ++j) acc[j] += lr[j];
          }
          store_row<T>(acc, k, out, gcs);
        }
      }
    }
  });
  return sum_in_order(partial);
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad_y, const Tensor& x, const Tensor& h, const Tensor& lora_a,
                                    const Tensor& lora_b, double scale, double dropout_p,
                                    const std::optional<Tensor>& seed, at::IntArrayRef slice_offsets,
                                    const std::optional<Tensor>& grad_x) {
  const std::vector<int64_t> off =
      check_backward_args(grad_y, x, h, lora_a, lora_b, scale, dropout_p, seed, slice_offsets, grad_x);
  // The ATen calls below are this kernel's internals: keep them out of autograd (the op's formula
  // is registered separately) even when the op is reached by a redispatch without a guard.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const Dropout drop = make_dropout(dropout_p, seed);
  const int64_t m = x.size(0), k = x.size(1), n = grad_y.size(1);
  const int64_t big_r = lora_a.size(0), r = lora_b.size(1);
  const int64_t slices = static_cast<int64_t>(off.size()) - 1;
  const auto aopt = x.options().dtype(acc);
  if (m == 0) {
    return {at::zeros({big_r, k}, lora_a.options()), at::zeros({n, r}, lora_b.options())};
  }
  const Tensor a = adapter_as(lora_a, acc);  // [R, K]
  const Tensor b = adapter_as(lora_b, acc);  // [N, r]
  const bool wide = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;

  Tensor g = at::empty({m, big_r}, aopt);
  Tensor grad_b;
  Tensor grad_a;
  dispatch_value_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // ---- the grad_y pass: g and grad_b
#ifdef LORACUDA_X86_DISPATCH
    const bool one_read = x.scalar_type() == at::kFloat && col_stride(grad_y) == 1 && one_read_loop_applies(h, r);
#else
    const bool one_read = false;
#endif
    if (one_read) {
#ifdef LORACUDA_X86_DISPATCH
      grad_b = grad_y_pass_one_read(grad_y, h, b, scale, off, g);
#endif
    } else if (wide) {
      // Elsewhere (float64, strided grad_y, r > 64, no AVX-512): BLAS, grad_y read twice.
      // grad_b^T [r, N] = h^T @ grad_y: with grad_y row-major, BLAS streams it about 1.6x faster in this
      // orientation than as grad_y^T @ h (measured, fp32, M = N = 2048, r = 16: 0.85 ms against 1.4 ms).
      Tensor grad_b_t = at::empty({r, n}, aopt);
      for (int64_t s = 0; s < slices; ++s) {
        const int64_t n0 = off[s], ns = off[s + 1] - off[s];
        const Tensor dys = grad_y.narrow(1, n0, ns);
        if (slices == 1) {
          at::mm_out(g, dys, b);
        } else {
          g.narrow(1, s * r, r).copy_(at::mm(dys, b.narrow(0, n0, ns)));
        }
        Tensor gbs = grad_b_t.narrow(1, n0, ns);
        at::mm_out(gbs, h.narrow(1, s * r, r).t(), dys);
      }
      g.mul_(scale);
      grad_b = grad_b_t.t().contiguous().mul_(scale);
    } else if constexpr (!std::is_same_v<acc_t<T>, double> && !std::is_same_v<T, float>) {
      grad_b = grad_y_pass_blocked<T>(grad_y, h, b, scale, off, g);
    }
    // ---- the x pass: grad_a and grad_x
#ifdef LORACUDA_X86_DISPATCH
    const bool fused_x = x.scalar_type() == at::kFloat && detail::isa() == detail::Isa::avx512 &&
                         col_stride(x) == 1 && (!grad_x.has_value() || col_stride(*grad_x) == 1);
#else
    const bool fused_x = false;
#endif
    if (fused_x) {
#ifdef LORACUDA_X86_DISPATCH
      grad_a = x_pass_one_read(x, g, a, drop, grad_x);
#endif
    } else if (wide && !drop.active) {
      grad_a = at::mm(g.t(), x);
      if (grad_x.has_value()) grad_x->addmm_(g, a);
    } else {
      grad_a = x_pass_blocked<T>(x, g, a, drop, grad_x);
    }
  });
  return {grad_a.to(lora_a.scalar_type()), grad_b.to(lora_b.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, CPU, m) { m.impl("backward", &backward); }

}  // namespace cpu
}  // namespace loracuda
