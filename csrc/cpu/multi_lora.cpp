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
// A group is an "item" of at most `block_rows` tokens of one adapter:
// - contiguous: a run of consecutive tokens (prefill: one sequence = one adapter). float32 / float64
//   values are used in place as a row slice of x / y; bf16 / fp16 rows are converted block-wise.
// - gathered: the adapter's tokens outside such runs, copied into a float32 block (its rows of x, or of
//   h and y), computed there and scattered back.
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

struct Item {
  int32_t adapter;
  bool contiguous;
  int64_t first;  // contiguous: the first token; gathered: offset of its tokens in Grouping::tokens
  int64_t count;  // tokens, 1 .. max_rows
};

struct Grouping {
  std::vector<int64_t> tokens;  // token indices of the gathered items, adapter by adapter, ascending
  std::vector<Item> items;      // adapter by adapter (items of one adapter are consecutive)
};

// Splits the tokens with id >= 0 and a non-zero rank into items of at most max_rows tokens.
Grouping group_tokens(const int32_t* ids, int64_t m, const int32_t* ranks, int64_t adapters, int64_t max_rows) {
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

  Grouping g;
  g.tokens.reserve(order.size());
  for (int64_t l = 0; l < adapters; ++l) {
    if (start[l] == start[l + 1] || ranks[l] == 0) continue;  // rank 0: the adapter adds nothing
    const int64_t gathered_begin = static_cast<int64_t>(g.tokens.size());
    for (int64_t i = start[l]; i < start[l + 1];) {
      int64_t j = i + 1;
      while (j < start[l + 1] && order[j] == order[j - 1] + 1) ++j;
      if (j - i >= kMinRun) {
        for (int64_t t0 = order[i]; t0 <= order[j - 1]; t0 += max_rows) {
          g.items.push_back({static_cast<int32_t>(l), true, t0, std::min(max_rows, order[j - 1] + 1 - t0)});
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

  const int32_t* rp = ranks.const_data_ptr<int32_t>();
  const int64_t bm = block_rows(k, x.scalar_type() == at::kDouble ? 8 : 4);
  const Grouping g = group_tokens(adapter_ids.const_data_ptr<int32_t>(), m, rp, lora_a_all.size(0), bm);
  if (g.items.empty()) return h;
  const bool wide = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;

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
        const Tensor a = cache.slice_rows(item.adapter, num_slices, rank);  // [S, rank, K]
        // The item's rows of x, in the accumulation dtype.
        Tensor xin;
        if (item.contiguous && wide) {
          xin = x.narrow(0, item.first, cnt);
        } else {
          xbuf.resize(static_cast<size_t>(bm * k));
          for (int64_t i = 0; i < cnt; ++i) {
            const int64_t t = item.contiguous ? item.first + i : g.tokens[item.first + i];
            load_row(xp + t * xrs, xcs, k, xbuf.data() + i * k);
          }
          xin = at::from_blob(xbuf.data(), {cnt, k}, opts);
        }
        // Its rows of h: in place for a contiguous item, else a block scattered afterwards.
        Tensor hout;
        if (item.contiguous) {
          hout = h.narrow(0, item.first, cnt);
        } else {
          hbuf.resize(static_cast<size_t>(bm * r_total));
          hout = at::from_blob(hbuf.data(), {cnt, r_total}, opts);
        }
        for (int64_t s = 0; s < num_slices; ++s) {
          Tensor out = hout.narrow(1, s * r_max, rank);
          at::mm_out(out, xin, a.select(0, s).t());
        }
        if (!item.contiguous) {
          for (int64_t i = 0; i < cnt; ++i) {
            const int64_t t = g.tokens[item.first + i];
            for (int64_t s = 0; s < num_slices; ++s) {
              std::memcpy(hp + t * r_total + s * r_max, hbuf.data() + i * r_total + s * r_max,
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
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(y.scalar_type());
  const int64_t m = y.size(0), n = y.size(1), r_total = h.size(1);
  const int64_t slices = static_cast<int64_t>(off.size()) - 1;
  if (m == 0) return;

  const int32_t* rp = ranks.const_data_ptr<int32_t>();
  const float* sp = scales.const_data_ptr<float>();
  const int64_t bm = block_rows(n, y.scalar_type() == at::kDouble ? 8 : 4);
  const Grouping g = group_tokens(adapter_ids.const_data_ptr<int32_t>(), m, rp, lora_b_all.size(0), bm);
  if (g.items.empty()) return;
  const bool wide = y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble;

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
        const double scale = sp[item.adapter];
        const Tensor b = cache.columns(item.adapter, rank);  // [N, rank]
        auto token = [&](int64_t i) { return item.contiguous ? item.first + i : g.tokens[item.first + i]; };
        // The item's rows of h.
        Tensor hin;
        if (item.contiguous) {
          hin = h.narrow(0, item.first, cnt);
        } else {
          hbuf.resize(static_cast<size_t>(bm * r_total));
          for (int64_t i = 0; i < cnt; ++i) load_row(hp + token(i) * hrs, hcs, r_total, hbuf.data() + i * r_total);
          hin = at::from_blob(hbuf.data(), {cnt, r_total}, opts);
        }
        auto add_slices = [&](const Tensor& yrows) {
          for (int64_t s = 0; s < slices; ++s) {
            const int64_t n0 = off[s], ns = off[s + 1] - off[s];
            yrows.narrow(1, n0, ns).addmm_(hin.narrow(1, s * r_max, rank), b.narrow(0, n0, ns).t(), 1.0, scale);
          }
        };
        if (item.contiguous && wide) {
          add_slices(y.narrow(0, item.first, cnt));
          continue;
        }
        // bf16 / fp16 rows, or gathered rows: widened into a block, updated, rounded back once.
        ybuf.resize(static_cast<size_t>(bm * n));
        for (int64_t i = 0; i < cnt; ++i) load_row(yp + token(i) * yrs, ycs, n, ybuf.data() + i * n);
        add_slices(at::from_blob(ybuf.data(), {cnt, n}, opts));
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
