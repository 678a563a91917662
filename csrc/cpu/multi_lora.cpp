// CPU kernels of the multi-LoRA serving ops (see csrc/ops.cpp):
//   multi_shrink:      h [M, S*r_max] with h[m, i*r_max + j] = x[m] . lora_a_all[id_m, i*r_max + j] for j < rank
//   multi_expand_add_: y[m, off[i]:off[i+1]] += scales[id_m] * h[m, i*r_max : i*r_max + rank] @
//                      lora_b_all[id_m, off[i]:off[i+1], :rank]^T
// with rank = ranks[id_m]; tokens with id -1 get h row 0 and keep their y row bit for bit.
//
// Both kernels group the tokens by adapter once per call (a counting sort of the ids, O(M + L)) and
// run one GEMM per group of rows of one adapter (at::mm / addmm_ on views, float32 accumulation,
// float64 for float64 values), using only the first `rank` rows (columns of lora_b_all) of each slice:
// the padded rows beyond an adapter's rank are never read, whatever they hold.
//
// A group is an "item" of tokens of one adapter (at most block_rows of them, an L2-sized block, where
// the rows go through a buffer; at most kRunRows where they are used in place):
// - contiguous: a run of consecutive tokens (prefill: one sequence = one adapter). float32 / float64
//   values are used in place as a row slice of x / y; bf16 / fp16 rows are converted block-wise.
// - gathered: the adapter's tokens outside such runs, copied into a float32 block (its rows of x, or of
//   h and y), computed there and scattered back.
// - small: an item of at most kSmallRows tokens (decode: many adapters, a token or two each) skips
//   ATen altogether: plain loops over the adapter's rows (read in their stored dtype, no converted
//   copy), which costs less than the dispatch of a GEMM on so few rows.
// Items are independent (each writes its own rows of h or y), so they run in parallel.
#include <torch/library.h>

#include "checks.h"
#include "cpu/common.h"

namespace loracuda {
namespace cpu {
namespace {

// Shortest run of consecutive tokens of one adapter that is used in place (a contiguous item);
// shorter runs join the adapter's gathered tokens, so that one GEMM covers them all.
constexpr int64_t kMinRun = 4;

// Rows per item of a run used in place: large enough that the GEMM runs at full speed, small enough
// that a single adapter's prefill (thousands of tokens) still splits over the threads.
constexpr int64_t kRunRows = 256;

// Items of at most this many tokens are computed by the loops of small_shrink / small_expand.
constexpr int64_t kSmallRows = 4;

struct Item {
  int32_t adapter;
  bool contiguous;
  int64_t first;  // contiguous: the first token; gathered: offset of its tokens in Grouping::tokens
  int64_t count;  // tokens, >= 1
};

struct Grouping {
  std::vector<int64_t> tokens;  // token indices of the gathered items, adapter by adapter, ascending
  std::vector<Item> items;      // adapter by adapter (items of one adapter are consecutive)

  // The token index of the i-th token (i < count) of an item.
  int64_t token(const Item& item, int64_t i) const {
    return item.contiguous ? item.first + i : tokens[static_cast<size_t>(item.first + i)];
  }
};

// Splits the tokens with id >= 0 and a non-zero rank into items: gathered ones of at most max_rows
// tokens, contiguous ones of at most max_rows too, or, when `in_place` (float32 / float64 rows, used
// as views without a buffer), of at most kRunRows, so that a long run is a few large GEMMs that
// still spread over the threads. The split depends on the ids and sizes only, not on the thread count.
Grouping group_tokens(const int32_t* ids, int64_t m, const int32_t* ranks, int64_t adapters, int64_t max_rows,
                      bool in_place) {
  // Counting sort: order holds the tokens adapter by adapter, ascending within an adapter.
  std::vector<int64_t> start(static_cast<size_t>(adapters + 1), 0);
  for (int64_t t = 0; t < m; ++t) {
    if (ids[t] >= 0) ++start[ids[t] + 1];
  }
  for (int64_t l = 0; l < adapters; ++l) start[l + 1] += start[l];
  std::vector<int64_t> order(static_cast<size_t>(start[adapters]));
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < m; ++t) {
      if (ids[t] >= 0) order[next[ids[t]]++] = t;
    }
  }

  const int64_t run_rows = in_place ? std::max(max_rows, kRunRows) : max_rows;

  Grouping g;
  g.tokens.reserve(order.size());
  for (int64_t l = 0; l < adapters; ++l) {
    if (start[l] == start[l + 1] || ranks[l] == 0) continue;  // rank 0: the adapter adds nothing
    const int64_t gathered_begin = static_cast<int64_t>(g.tokens.size());
    for (int64_t i = start[l]; i < start[l + 1];) {
      int64_t j = i + 1;
      while (j < start[l + 1] && order[j] == order[j - 1] + 1) ++j;
      if (j - i >= kMinRun) {
        for (int64_t t0 = order[i]; t0 <= order[j - 1]; t0 += run_rows) {
          g.items.push_back({static_cast<int32_t>(l), true, t0, std::min(run_rows, order[j - 1] + 1 - t0)});
        }
      } else {
        g.tokens.insert(g.tokens.end(), order.begin() + i, order.begin() + j);
      }
      i = j;
    }
    const int64_t gathered_end = static_cast<int64_t>(g.tokens.size());
    for (int64_t o = gathered_begin; o < gathered_end; o += max_rows) {
      g.items.push_back({static_cast<int32_t>(l), false, o, std::min(max_rows, gathered_end - o)});
    }
  }
  return g;
}

// The factor of one adapter in the accumulation dtype, per worker thread: a view of the stacked
// tensor when it already has that dtype, else its used part converted once per run of items of the
// same adapter (items come adapter by adapter, and each worker takes a consecutive range of them).
class AdapterCache {
 public:
  AdapterCache(const Tensor& all, at::ScalarType acc) : all_(all), acc_(acc), convert_(all.scalar_type() != acc) {}

  // rows [i*r_max, i*r_max + rank) of every slice i of adapter l (shrink: lora_a_all [L, S*r_max, K]),
  // as a [S, rank, K] tensor.
  Tensor slice_rows(int32_t l, int64_t slices, int64_t rank) {
    const Tensor a = all_.select(0, l);
    const Tensor used = a.view({slices, a.size(0) / slices, a.size(1)}).narrow(1, 0, rank);
    if (!convert_) return used;
    if (l != cached_) {
      value_ = used.to(acc_);  // reads only the used rows
      cached_ = l;
    }
    return value_;
  }

  // columns [0, rank) of adapter l (expand: lora_b_all [L, N, r_max]) as an [N, rank] tensor.
  Tensor columns(int32_t l, int64_t rank) {
    const Tensor used = all_.select(0, l).narrow(1, 0, rank);
    if (!convert_) return used;
    if (l != cached_) {
      value_ = used.to(acc_);
      cached_ = l;
    }
    return value_;
  }

 private:
  const Tensor& all_;
  at::ScalarType acc_;
  bool convert_;
  int32_t cached_ = -1;
  Tensor value_;
};

// ---- the loops of small items -------------------------------------------------------------------

// sum_i x[i] * w[i] for i < n in the accumulation type A: x already in A, w in its stored type W
// (widened exactly). kLanes independent partial sums (the compiler keeps them in vector registers),
// then added pairwise.
template <typename A, typename W>
inline A dot(const A* x, const W* w, int64_t n) {
  constexpr int kLanes = 8;
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += x[i + l] * static_cast<A>(to_acc(w[i + l]));
  }
  for (int l = 0; i < n; ++i, ++l) part[l] += x[i] * static_cast<A>(to_acc(w[i]));
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) part[l] += part[l + width];
  }
  return part[0];
}

// h rows of `cnt` tokens of one adapter: xrows [cnt, K] (accumulation type, contiguous);
// a = the adapter's [S*r_max, K] rows in their stored type; out[i] = h's row of token i.
template <typename A, typename W>
void small_shrink(const A* xrows, int64_t cnt, int64_t k, const W* a, int64_t slices, int64_t r_max, int64_t rank,
                  A* const* out) {
  for (int64_t s = 0; s < slices; ++s) {
    for (int64_t j = 0; j < rank; ++j) {
      const W* row = a + (s * r_max + j) * k;  // read once from memory, then from L1 for the other tokens
      for (int64_t i = 0; i < cnt; ++i) out[i][s * r_max + j] = dot(xrows + i * k, row, k);
    }
  }
}

// Columns [c0, c1) of slice s of small_expand (below), one dot product of length `rank` each.
template <typename A, typename W>
void small_expand_cols(A* yrows, int64_t cnt, int64_t n, const A* hrows, int64_t r_total, const W* b, int64_t r_max,
                       int64_t rank, int64_t s, int64_t c0, int64_t c1, A scale) {
  for (int64_t c = c0; c < c1; ++c) {
    const W* row = b + c * r_max;
    for (int64_t i = 0; i < cnt; ++i) yrows[i * n + c] += scale * dot(hrows + i * r_total + s * r_max, row, rank);
  }
}

#ifdef LORACUDA_X86_DISPATCH
namespace avx2 {

// 8 consecutive adapter values widened to float.
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));  // exact: bf16 is float's top half
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // exact
}

// The 8 horizontal sums of v[0..7] as one vector: lane q = v[q][0] + ... + v[q][7].
__attribute__((target("avx2,fma,f16c"))) inline __m256 sums8(const __m256* v) {
  const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// small_expand_cols for float rows over whole blocks of 8 columns from c0; returns the first column
// not done (the caller finishes the < 8 left). Each column's dot runs over `rank` in 8-lane chunks
// (a scalar-filled, zero-padded chunk for rank % 8, so the padding beyond rank is never read), the 8
// columns' sums are reduced together, and y += scale * sum is one fused multiply-add.
template <typename W>
__attribute__((target("avx2,fma,f16c"))) int64_t expand_cols(float* yrows, int64_t cnt, int64_t n,
                                                              const float* hrows, int64_t r_total, const W* b,
                                                              int64_t r_max, int64_t rank, int64_t s, int64_t c0,
                                                              int64_t c1, float scale) {
  const int64_t full = rank / 8 * 8, rem = rank - full;
  float h_tail[kSmallRows][8] = {};
  for (int64_t i = 0; i < cnt; ++i) {
    for (int64_t u = 0; u < rem; ++u) h_tail[i][u] = hrows[i * r_total + s * r_max + full + u];
  }
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    for (int64_t i = 0; i < cnt; ++i) {
      const float* hv = hrows + i * r_total + s * r_max;
      __m256 acc[8];
      for (int q = 0; q < 8; ++q) {
        const W* row = b + (c + q) * r_max;
        __m256 a = _mm256_setzero_ps();
        for (int64_t j = 0; j < full; j += 8) a = _mm256_fmadd_ps(load8(row + j), _mm256_loadu_ps(hv + j), a);
        if (rem) {
          float tail[8] = {};
          for (int64_t u = 0; u < rem; ++u) tail[u] = to_acc(row[full + u]);
          a = _mm256_fmadd_ps(_mm256_loadu_ps(tail), _mm256_loadu_ps(h_tail[i]), a);
        }
        acc[q] = a;
      }
      float* yv = yrows + i * n + c;
      _mm256_storeu_ps(yv, _mm256_fmadd_ps(vs, sums8(acc), _mm256_loadu_ps(yv)));
    }
  }
  return c;
}

inline bool available() {
  static const bool value = detail::isa() != detail::Isa::generic && __builtin_cpu_supports("f16c");
  return value;
}

}  // namespace avx2
#endif

#ifdef LORACUDA_X86_DISPATCH
namespace avx512 {

// The shrink of an item's float32 rows without BLAS: out[i * os + j] = sum_k x[i * xs + k] * a[j * k_len + k]
// for i < rows, j < cols (x rows and a rows of unit stride). Blocks of 4 rows of x by 4 rows of a keep
// 16 accumulators of 16 lanes, so each vector loaded from x serves 4 rows of a and each one from a serves
// 4 rows of x; the k tail is one masked step. Why not BLAS here: on the 2-core machine of the README,
// rank-16 GEMMs on 64-256-row items, run by several threads at once, did not get faster with the second
// thread (0.59 ms for 2048 rows, K = 1024, on 1 or 2 threads), while this loop does (0.58 -> 0.38 ms).
template <int kRows, int kCols>
__attribute__((target("avx512f"))) void block(const float* x, int64_t xs, int nr, const float* a, int64_t k_len, int nc,
                                              float* out, int64_t os) {
  __m512 acc[kRows][kCols];
  const float* xr[kRows];
  const float* ar[kCols];
  for (int i = 0; i < kRows; ++i) xr[i] = x + (i < nr ? i : nr - 1) * xs;     // rows past nr repeat the last
  for (int j = 0; j < kCols; ++j) ar[j] = a + (j < nc ? j : nc - 1) * k_len;  // (computed, never stored)
  for (int i = 0; i < kRows; ++i) {
    for (int j = 0; j < kCols; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 16 <= k_len; k += 16) {
    __m512 xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = _mm512_loadu_ps(xr[i] + k);
    for (int j = 0; j < kCols; ++j) {
      const __m512 av = _mm512_loadu_ps(ar[j] + k);
      for (int i = 0; i < kRows; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], av, acc[i][j]);
    }
  }
  if (k < k_len) {  // masked lanes are neither read nor added
    const __mmask16 mask = static_cast<__mmask16>((1u << (k_len - k)) - 1u);
    __m512 xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = _mm512_maskz_loadu_ps(mask, xr[i] + k);
    for (int j = 0; j < kCols; ++j) {
      const __m512 av = _mm512_maskz_loadu_ps(mask, ar[j] + k);
      for (int i = 0; i < kRows; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], av, acc[i][j]);
    }
  }
  for (int i = 0; i < nr; ++i) {
    for (int j = 0; j < nc; ++j) out[i * os + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

inline void rows_times_rows_t(const float* x, int64_t xs, int64_t rows, const float* a, int64_t k_len, int64_t cols,
                              float* out, int64_t os) {
  constexpr int kR = 4, kC = 4;
  for (int64_t j0 = 0; j0 < cols; j0 += kC) {
    const int nc = static_cast<int>(std::min<int64_t>(kC, cols - j0));
    for (int64_t i0 = 0; i0 < rows; i0 += kR) {
      const int nr = static_cast<int>(std::min<int64_t>(kR, rows - i0));
      block<kR, kC>(x + i0 * xs, xs, nr, a + j0 * k_len, k_len, nc, out + i0 * os + j0, os);
    }
  }
}

inline bool available() { return detail::isa() == detail::Isa::avx512; }

}  // namespace avx512
#endif

// y rows [cnt, N] (accumulation type, contiguous) += scale * h rows [cnt, S*r_max] (contiguous) per
// slice against b = the adapter's [N, r_max] in its stored type, columns j < rank only. float rows
// take the AVX2 path where the CPU has it (the dot products there are short: rank, not K).
template <typename A, typename W>
void small_expand(A* yrows, int64_t cnt, int64_t n, const A* hrows, int64_t r_total, const W* b, int64_t r_max,
                  int64_t rank, const std::vector<int64_t>& off, A scale) {
  const int64_t slices = static_cast<int64_t>(off.size()) - 1;
  for (int64_t s = 0; s < slices; ++s) {
    int64_t c = off[s];
#ifdef LORACUDA_X86_DISPATCH
    if constexpr (std::is_same_v<A, float> && !std::is_same_v<W, double>) {
      if (avx2::available()) c = avx2::expand_cols<W>(yrows, cnt, n, hrows, r_total, b, r_max, rank, s, c, off[s + 1], scale);
    }
#endif
    small_expand_cols<A, W>(yrows, cnt, n, hrows, r_total, b, r_max, rank, s, c, off[s + 1], scale);
  }
}

// ---- multi_shrink -------------------------------------------------------------------------------

Tensor multi_shrink(const Tensor& x, const Tensor& lora_a_all, const Tensor& ranks, const Tensor& adapter_ids,
                    int64_t num_slices) {
  check_multi_shrink_args(x, lora_a_all, ranks, adapter_ids, num_slices);
  const int64_t r_total = lora_a_all.size(1), r_max = r_total / num_slices;
  check_multi_values_cpu(ranks, r_max, adapter_ids, "multi_shrink");
  // The ATen calls below are this kernel's internals: keep them out of autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  // Zero: the rows of tokens without an adapter and the columns beyond each adapter's rank.
  Tensor h = at::zeros({m, r_total}, x.options().dtype(acc));
  if (m == 0) return h;

  const bool wide = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  const int32_t* rp = ranks.const_data_ptr<int32_t>();
  const int64_t bm = block_rows(k, x.scalar_type() == at::kDouble ? 8 : 4);
  const Grouping g = group_tokens(adapter_ids.const_data_ptr<int32_t>(), m, rp, lora_a_all.size(0), bm, wide);
  if (g.items.empty()) return h;

  dispatch_value_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* xp = x.const_data_ptr<T>();
    A* hp = h.data_ptr<A>();
    const int64_t xrs = row_stride(x), xcs = col_stride(x);
    const auto opts = x.options().dtype(acc);
    at::parallel_for(0, static_cast<int64_t>(g.items.size()), 1, [&](int64_t i0, int64_t i1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
      AdapterCache cache(lora_a_all, acc);
      std::vector<A> xbuf, hbuf;
      for (int64_t it = i0; it < i1; ++it) {
        const Item& item = g.items[it];
        const int64_t rank = rp[item.adapter], cnt = item.count;
        auto token = [&](int64_t i) { return g.token(item, i); };
        const bool in_place = item.contiguous && wide && cnt > kSmallRows;
        if (!in_place) {  // the item's rows of x, in the accumulation dtype
          xbuf.resize(static_cast<size_t>(bm * k));
          for (int64_t i = 0; i < cnt; ++i) load_row(xp + token(i) * xrs, xcs, k, xbuf.data() + i * k);
        }
        if (cnt <= kSmallRows) {
          A* out[kSmallRows];
          for (int64_t i = 0; i < cnt; ++i) out[i] = hp + token(i) * r_total;
          dispatch_value_type(lora_a_all.scalar_type(), [&](auto wtag) {
            using W = decltype(wtag);
            const W* a = lora_a_all.const_data_ptr<W>() + static_cast<int64_t>(item.adapter) * r_total * k;
            small_shrink<A, W>(xbuf.data(), cnt, k, a, num_slices, r_max, rank, out);
          });
          continue;
        }
        const Tensor xin = in_place ? x.narrow(0, item.first, cnt) : at::from_blob(xbuf.data(), {cnt, k}, opts);
        // Its rows of h: in place for a contiguous item, else a block scattered afterwards.
        Tensor hout;
        if (item.contiguous) {
          hout = h.narrow(0, item.first, cnt);
        } else {
          hbuf.resize(static_cast<size_t>(bm * r_total));
          hout = at::from_blob(hbuf.data(), {cnt, r_total}, opts);
        }
        bool done = false;
#ifdef LORACUDA_X86_DISPATCH
        if constexpr (std::is_same_v<A, float>) {
          if (avx512::available() && xin.stride(1) == 1) {
            const bool stored_float = lora_a_all.scalar_type() == acc;
            const Tensor a = stored_float ? Tensor() : cache.slice_rows(item.adapter, num_slices, rank).contiguous();
            for (int64_t s = 0; s < num_slices; ++s) {
              const float* rows = stored_float ? lora_a_all.const_data_ptr<float>() +
                                                     (static_cast<int64_t>(item.adapter) * r_total + s * r_max) * k
                                               : a.const_data_ptr<float>() + s * rank * k;
              avx512::rows_times_rows_t(xin.const_data_ptr<float>(), xin.stride(0), cnt, rows, k, rank,
                                        hout.data_ptr<float>() + s * r_max, hout.stride(0));
            }
            done = true;
          }
        }
#endif
        if (!done && rank == r_max && lora_a_all.scalar_type() == acc) {  // every row used: one GEMM for all slices
          at::mm_out(hout, xin, lora_a_all.select(0, item.adapter).t());
        } else if (!done) {
          const Tensor a = cache.slice_rows(item.adapter, num_slices, rank);  // [S, rank, K]
          for (int64_t s = 0; s < num_slices; ++s) {
            Tensor out = hout.narrow(1, s * r_max, rank);
            at::mm_out(out, xin, a.select(0, s).t());
          }
        }
        if (!item.contiguous) {
          for (int64_t i = 0; i < cnt; ++i) {
            for (int64_t s = 0; s < num_slices; ++s) {
              std::memcpy(hp + token(i) * r_total + s * r_max, hbuf.data() + i * r_total + s * r_max,
                          static_cast<size_t>(rank) * sizeof(A));
            }
          }
        }
      }
    });
  });
  return h;
}

// ---- multi_expand_add_ --------------------------------------------------------------------------

void multi_expand_add_(Tensor& y, const Tensor& h, const Tensor& lora_b_all, const Tensor& scales, const Tensor& ranks,
                       const Tensor& adapter_ids, at::IntArrayRef slice_offsets) {
  const std::vector<int64_t> off =
      check_multi_expand_add_args(y, h, lora_b_all, scales, ranks, adapter_ids, slice_offsets);
  const int64_t r_max = lora_b_all.size(2);
  check_multi_values_cpu(ranks, r_max, adapter_ids, "multi_expand_add_");
  check_multi_scales_cpu(scales, adapter_ids, "multi_expand_add_");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(y.scalar_type());
  const int64_t m = y.size(0), n = y.size(1), r_total = h.size(1);
  const int64_t slices = static_cast<int64_t>(off.size()) - 1;
  if (m == 0) return;

  const bool wide = y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble;
  const int32_t* rp = ranks.const_data_ptr<int32_t>();
  const float* sp = scales.const_data_ptr<float>();
  const int64_t bm = block_rows(n, y.scalar_type() == at::kDouble ? 8 : 4);
  const Grouping g = group_tokens(adapter_ids.const_data_ptr<int32_t>(), m, rp, lora_b_all.size(0), bm, wide);
  if (g.items.empty()) return;

  dispatch_value_type(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    T* yp = y.data_ptr<T>();
    const A* hp = h.const_data_ptr<A>();
    const int64_t yrs = row_stride(y), ycs = col_stride(y);
    const int64_t hrs = row_stride(h), hcs = col_stride(h);
    const auto opts = y.options().dtype(acc);
    at::parallel_for(0, static_cast<int64_t>(g.items.size()), 1, [&](int64_t i0, int64_t i1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
      AdapterCache cache(lora_b_all, acc);
      std::vector<A> ybuf, hbuf;
      for (int64_t it = i0; it < i1; ++it) {
        const Item& item = g.items[it];
        const int64_t rank = rp[item.adapter], cnt = item.count;
        const float scale = sp[item.adapter];
        auto token = [&](int64_t i) { return g.token(item, i); };
        const bool small = cnt <= kSmallRows;
        // The item's rows of h: a view for a contiguous GEMM item, else gathered (unit stride).
        Tensor hin;
        if (item.contiguous && !small) {
          hin = h.narrow(0, item.first, cnt);
        } else {
          hbuf.resize(static_cast<size_t>(bm * r_total));
          for (int64_t i = 0; i < cnt; ++i) load_row(hp + token(i) * hrs, hcs, r_total, hbuf.data() + i * r_total);
          if (!small) hin = at::from_blob(hbuf.data(), {cnt, r_total}, opts);
        }
        auto add_slices = [&](const Tensor& yrows) {
          const Tensor b = cache.columns(item.adapter, rank);  // [N, rank]
          for (int64_t s = 0; s < slices; ++s) {
            const int64_t n0 = off[s], ns = off[s + 1] - off[s];
            yrows.narrow(1, n0, ns).addmm_(hin.narrow(1, s * r_max, rank), b.narrow(0, n0, ns).t(), 1.0, scale);
          }
        };
        if (item.contiguous && wide && !small) {
          add_slices(y.narrow(0, item.first, cnt));
          continue;
        }
        // Small items, bf16 / fp16 rows or gathered rows: widened into a block, updated, rounded back once.
        ybuf.resize(static_cast<size_t>(bm * n));
        for (int64_t i = 0; i < cnt; ++i) load_row(yp + token(i) * yrs, ycs, n, ybuf.data() + i * n);
        if (small) {
          dispatch_value_type(lora_b_all.scalar_type(), [&](auto wtag) {
            using W = decltype(wtag);
            const W* b = lora_b_all.const_data_ptr<W>() + static_cast<int64_t>(item.adapter) * n * r_max;
            small_expand<A, W>(ybuf.data(), cnt, n, hbuf.data(), r_total, b, r_max, rank, off, static_cast<A>(scale));
          });
        } else {
          add_slices(at::from_blob(ybuf.data(), {cnt, n}, opts));
        }
        for (int64_t i = 0; i < cnt; ++i) store_row<T>(ybuf.data() + i * n, n, yp + token(i) * yrs, ycs);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, CPU, m) {
  m.impl("multi_shrink", &multi_shrink);
  m.impl("multi_expand_add_", &multi_expand_add_);
}

}  // namespace cpu
}  // namespace loracuda
