// CPU kernels of the grouped ops (schemas and formulas in csrc/ops.cpp): grouped_shrink,
// grouped_expand_add_, grouped_backward, grouped_mm, grouped_weight_grad and the fused grouped_lora_linear.
//
// Every kernel sorts the rows by group once (cpu/grouped_rows.h: a counting sort, O(M + G)) and cuts each
// group into items of a fixed number of rows; items run in parallel (at::parallel_for), each one GEMM per
// operand on its rows (at::mm / addmm_, float32 accumulation, float64 for float64 values):
// - a contiguous item (its rows consecutive: rows sorted by group, as a mixture-of-experts dispatch
//   that sorts its tokens gives them) uses float32 / float64 tensors in place as row slices;
// - otherwise its rows are gathered into a buffer in the accumulation type (widened, and masked when
//   dropout is on), used, and the results scattered back to their rows.
// Factors are any strided view (PEFT's target_parameters layout is a permuted one); they are small
// ([G, r, K], [G, N, r]), so each call converts them once to contiguous accumulation-type tensors.
//
// grouped_lora_linear gathers each item's rows of x once and feeds them to the base GEMM (the expert
// weight) and to the shrink, and writes each y row once (base + LoRA, one rounding for 16-bit values).
//
// Reductions over rows (grouped_backward's grad_a, grad_b) are summed per item, then over a group's
// items in order: the result depends on the ids and shapes only, not on the thread count.
#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "cpu/common.h"
#include "cpu/grouped_rows.h"
#include "grouped_checks.h"

namespace loracuda {
namespace cpu {
namespace {

// Rows per item of the forward ops (row-independent: the size changes speed only). Large enough for
// a full-speed GEMM, small enough that one big group still spreads over the threads.
constexpr int64_t kForwardItemRows = 128;
// Rows per item of grouped_backward: also the granularity of its deterministic reduction.
constexpr int64_t kBackwardItemRows = 256;

bool is_wide(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

// dst [cnt, width] (accumulation type, contiguous) = rows src_rows[i] (or i when null) of the 2-D array
// at `base` (row stride rs, column stride cs), masked by dropout element index mask_rows[i] * width + col;
// the mask goes to keep [cnt, width] when keep is not null.
template <typename T>
void load_rows(const T* base, int64_t rs, int64_t cs, int64_t cnt, int64_t width, const int64_t* src_rows,
               const int64_t* mask_rows, const Dropout& drop, acc_t<T>* dst, uint8_t* keep) {
  for (int64_t i = 0; i < cnt; ++i) {
    const T* src = base + (src_rows != nullptr ? src_rows[i] : i) * rs;
    acc_t<T>* row = dst + i * width;
    if (drop.active) {
      load_dropped_row(drop, static_cast<uint64_t>(mask_rows[i]) * static_cast<uint64_t>(width), src, cs, width, row,
                       keep != nullptr ? keep + i * width : nullptr);
    } else {
      load_row(src, cs, width, row);
    }
  }
}

// Row i of src [cnt, width] (contiguous, element size `bytes`) to row rows[i] of dst (contiguous, width wide).
void scatter_rows(const Tensor& src, const int64_t* rows, int64_t cnt, Tensor& dst) {
  const int64_t width = dst.size(1), bytes = static_cast<int64_t>(dst.element_size()) * width;
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* dp = static_cast<char*>(dst.data_ptr());
  for (int64_t i = 0; i < cnt; ++i) std::memcpy(dp + rows[i] * bytes, sp + i * bytes, static_cast<size_t>(bytes));
}

Tensor blob(std::vector<float>& buf, int64_t rows, int64_t cols, const at::TensorOptions& opt) {
  buf.resize(static_cast<size_t>(rows * cols));
  return at::from_blob(buf.data(), {rows, cols}, opt.dtype(at::kFloat));
}
Tensor blob(std::vector<double>& buf, int64_t rows, int64_t cols, const at::TensorOptions& opt) {
  buf.resize(static_cast<size_t>(rows * cols));
  return at::from_blob(buf.data(), {rows, cols}, opt.dtype(at::kDouble));
}

// The rows of the items as an int64 tensor (for index_select), sharing RowGroups::rows' memory.
Tensor rows_tensor(RowGroups& rg) {
  return at::from_blob(rg.rows.data(), {static_cast<int64_t>(rg.rows.size())}, at::TensorOptions().dtype(at::kLong));
}

// ---- grouped_shrink ---------------------------------------------------------------------------------

Tensor grouped_shrink(const Tensor& x, const Tensor& lora_a, const Tensor& group_ids, double dropout_p,
                      const std::optional<Tensor>& seed) {
  const char* op = "grouped_shrink";
  check_grouped_shrink_args(x, lora_a, group_ids, dropout_p, seed);
  const int64_t groups = lora_a.size(0), m = x.size(0), k = x.size(1), r = lora_a.size(1);
  check_group_values_cpu(group_ids, groups, op);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const Dropout drop = make_dropout(dropout_p, seed);
  Tensor h = at::zeros({m, r}, x.options().dtype(acc));  // rows with id -1 stay 0
  if (m == 0) return h;
  const RowGroups rg = group_rows(group_ids, groups, kForwardItemRows);
  const Tensor a = adapter_as(lora_a, acc);  // [G, r, K]
  const bool wide = is_wide(x.scalar_type());
  dispatch_value_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* xp = x.const_data_ptr<T>();
    const int64_t xrs = row_stride(x), xcs = col_stride(x);
    at::parallel_for(0, static_cast<int64_t>(rg.items.size()), 1, [&](int64_t i0, int64_t i1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: per worker thread
      std::vector<A> buf;
      for (int64_t i = i0; i < i1; ++i) {
        const GroupItem& it = rg.items[static_cast<size_t>(i)];
        const int64_t first = rg.first_row(it), cnt = it.count;
        const int64_t* rows = rg.item_rows(it);
        const Tensor a_t = a.select(0, it.group).t();  // [K, r]
        Tensor xs;
        if (wide && !drop.active && it.contiguous) {
          xs = x.narrow(0, first, cnt);
        } else {
          xs = blob(buf, cnt, k, x.options());
          load_rows<T>(xp, xrs, xcs, cnt, k, rows, rows, drop, buf.data(), nullptr);
        }
        if (it.contiguous) {
          Tensor hg = h.narrow(0, first, cnt);
          at::mm_out(hg, xs, a_t);
        } else {
          scatter_rows(at::mm(xs, a_t), rows, cnt, h);
        }
      }
    });
  });
  return h;
}

// ---- grouped_expand_add_ ----------------------------------------------------------------------------

void grouped_expand_add_(Tensor& y, const Tensor& h, const Tensor& lora_b, const Tensor& group_ids, double scale) {
  const char* op = "grouped_expand_add_";
  check_grouped_expand_args(y, h, lora_b, group_ids, scale);
  const int64_t groups = lora_b.size(0), m = y.size(0), n = y.size(1), r = lora_b.size(2);
  check_group_values_cpu(group_ids, groups, op);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (m == 0) return;
  const at::ScalarType acc = accumulate_dtype(y.scalar_type());
  const RowGroups rg = group_rows(group_ids, groups, kForwardItemRows);
  const Tensor b = adapter_as(lora_b, acc);  // [G, N, r]
  const bool wide = is_wide(y.scalar_type());
  const Dropout none;
  dispatch_value_type(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    T* yp = y.data_ptr<T>();
    const int64_t yrs = row_stride(y), ycs = col_stride(y);
    const A* hp = h.const_data_ptr<A>();
    const int64_t hrs = row_stride(h), hcs = col_stride(h);
    at::parallel_for(0, static_cast<int64_t>(rg.items.size()), 1, [&](int64_t i0, int64_t i1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<A> hbuf, ybuf;
      for (int64_t i = i0; i < i1; ++i) {
        const GroupItem& it = rg.items[static_cast<size_t>(i)];
        const int64_t first = rg.first_row(it), cnt = it.count;
        const int64_t* rows = rg.item_rows(it);
        const Tensor b_t = b.select(0, it.group).t();  // [r, N]
        Tensor hg;
        if (it.contiguous) {
          hg = h.narrow(0, first, cnt);
        } else {
          hg = blob(hbuf, cnt, r, h.options());
          load_rows<A>(hp, hrs, hcs, cnt, r, rows, rows, none, hbuf.data(), nullptr);
        }
        if (wide && it.contiguous) {
          y.narrow(0, first, cnt).addmm_(hg, b_t, 1.0, scale);
          continue;
        }
        Tensor yb = blob(ybuf, cnt, n, y.options());
        load_rows<T>(yp, yrs, ycs, cnt, n, rows, rows, none, ybuf.data(), nullptr);
        yb.addmm_(hg, b_t, 1.0, scale);
        for (int64_t j = 0; j < cnt; ++j) store_row<T>(ybuf.data() + j * n, n, yp + rows[j] * yrs, ycs);
      }
    });
  });
}

// ---- grouped_backward -------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> grouped_backward(const Tensor& grad_y, const Tensor& x, const Tensor& h,
                                            const Tensor& lora_a, const Tensor& lora_b, const Tensor& group_ids,
                                            double scale, double dropout_p, const std::optional<Tensor>& seed,
                                            const std::optional<Tensor>& grad_x) {
  const char* op = "grouped_backward";
  check_grouped_backward_args(grad_y, x, h, lora_a, lora_b, group_ids, scale, dropout_p, seed, grad_x);
  const int64_t groups = lora_a.size(0), k = x.size(1), n = grad_y.size(1), r = lora_a.size(1);
  check_group_values_cpu(group_ids, groups, op);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const Dropout drop = make_dropout(dropout_p, seed);
  const auto aopt = x.options().dtype(acc);
  Tensor grad_a = at::zeros({groups, r, k}, aopt);  // a group without rows keeps exact zeros
  Tensor grad_b = at::zeros({groups, n, r}, aopt);
  RowGroups rg = group_rows(group_ids, groups, kBackwardItemRows);
  const int64_t items = static_cast<int64_t>(rg.items.size());
  if (items > 0) {
    const Tensor a = adapter_as(lora_a, acc);  // [G, r, K]
    const Tensor b = adapter_as(lora_b, acc);  // [G, N, r]
    // A group of several items sums their partials (slot = item index) in item order afterwards.
    int64_t split_items = 0;
    for (const GroupItem& it : rg.items) split_items += it.items_in_group > 1 ? 1 : 0;
    Tensor part_a = split_items > 0 ? at::empty({items, r, k}, aopt) : Tensor();
    Tensor part_b = split_items > 0 ? at::empty({items, n, r}, aopt) : Tensor();
    const bool wide = is_wide(x.scalar_type());
    dispatch_value_type(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      const T* xp = x.const_data_ptr<T>();
      const T* dyp = grad_y.const_data_ptr<T>();
      const A* hp = h.const_data_ptr<A>();
      const int64_t xrs = row_stride(x), xcs = col_stride(x), dyrs = row_stride(grad_y), dycs = col_stride(grad_y);
      const int64_t hrs = row_stride(h), hcs = col_stride(h);
      T* gxp = grad_x.has_value() ? grad_x->data_ptr<T>() : nullptr;
      const int64_t gxrs = grad_x.has_value() ? row_stride(*grad_x) : 0;
      const int64_t gxcs = grad_x.has_value() ? col_stride(*grad_x) : 0;
      const Dropout none;
      at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        std::vector<A> dybuf, hbuf, xbuf, gxrow(gxp != nullptr ? static_cast<size_t>(k) : 0);
        std::vector<uint8_t> keep;
        for (int64_t i = i0; i < i1; ++i) {
          const GroupItem& it = rg.items[static_cast<size_t>(i)];
          const int64_t first = rg.first_row(it), cnt = it.count, e = it.group;
          const int64_t* rows = rg.item_rows(it);
          const bool split = it.items_in_group > 1;
          const bool in_place = wide && it.contiguous;
          // g = scale * grad_y_rows @ b_e  [cnt, r];  grad_b_e (+)= scale * grad_y_rows^T @ h_rows
          Tensor dy, hg;
          if (in_place) {
            dy = grad_y.narrow(0, first, cnt);
          } else {
            dy = blob(dybuf, cnt, n, aopt);
            load_rows<T>(dyp, dyrs, dycs, cnt, n, rows, rows, none, dybuf.data(), nullptr);
          }
          if (it.contiguous) {
            hg = h.narrow(0, first, cnt);
          } else {
            hg = blob(hbuf, cnt, r, aopt);
            load_rows<A>(hp, hrs, hcs, cnt, r, rows, rows, none, hbuf.data(), nullptr);
          }
          Tensor g = at::mm(dy, b.select(0, e)).mul_(scale);
          Tensor gb = split ? part_b.select(0, i) : grad_b.select(0, e);
          at::mm_out(gb, dy.t(), hg);
          gb.mul_(scale);
          // grad_a_e (+)= g^T @ dropped(x_rows);  grad_x_rows += dropped(g @ a_e)
          Tensor xs;
          const bool keep_mask = drop.active && gxp != nullptr;
          if (in_place && !drop.active) {
            xs = x.narrow(0, first, cnt);
          } else {
            xs = blob(xbuf, cnt, k, aopt);
            if (keep_mask) keep.resize(static_cast<size_t>(cnt * k));
            load_rows<T>(xp, xrs, xcs, cnt, k, rows, rows, drop, xbuf.data(), keep_mask ? keep.data() : nullptr);
          }
          Tensor ga = split ? part_a.select(0, i) : grad_a.select(0, e);
          at::mm_out(ga, g.t(), xs);
          if (gxp == nullptr) continue;
          if (in_place && !drop.active) {
            grad_x->narrow(0, first, cnt).addmm_(g, a.select(0, e));
            continue;
          }
          const Tensor lora = at::mm(g, a.select(0, e));  // [cnt, K], contiguous
          const A* lp = lora.const_data_ptr<A>();
          for (int64_t j = 0; j < cnt; ++j) {
            const A* lr = lp + j * k;
            T* out = gxp + rows[j] * gxrs;
            A* accrow = gxrow.data();
            load_row(out, gxcs, k, accrow);
            if (drop.active) {
              add_kept(keep.data() + j * k, drop.keep_scale, k, lr, accrow);
            } else {
              for (int64_t c = 0; c < k; ++c) accrow[c] += lr[c];
            }
            store_row<T>(accrow, k, out, gxcs);
          }
        }
      });
    });
    // The groups of several items: their partials added in item order.
    if (split_items > 0) {
      at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        for (int64_t i = i0; i < i1; ++i) {
          const GroupItem& it = rg.items[static_cast<size_t>(i)];
          if (it.items_in_group == 1 || it.first_item_of_group != i) continue;
          Tensor ga = grad_a.select(0, it.group), gb = grad_b.select(0, it.group);
          ga.copy_(part_a.select(0, i));
          gb.copy_(part_b.select(0, i));
          for (int64_t j = i + 1; j < i + it.items_in_group; ++j) {
            ga.add_(part_a.select(0, j));
            gb.add_(part_b.select(0, j));
          }
        }
      });
    }
  }
  return {grad_a.to(lora_a.scalar_type()), grad_b.to(lora_b.scalar_type())};
}

// ---- the base grouped GEMM ----------------------------------------------------------------------------

Tensor grouped_mm(const Tensor& x, const Tensor& weight, const Tensor& group_ids, bool transpose_weight) {
  const char* op = "grouped_mm";
  check_grouped_mm_args(x, weight, group_ids, transpose_weight);
  const int64_t groups = weight.size(0), m = x.size(0);
  check_group_values_cpu(group_ids, groups, op);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t width = transpose_weight ? weight.size(2) : weight.size(1);
  Tensor out = at::zeros({m, width}, x.options());  // rows with id -1 stay 0
  if (m == 0) return out;
  RowGroups rg = group_rows(group_ids, groups, kForwardItemRows);
  const Tensor rows_t = rows_tensor(rg);
  at::parallel_for(0, static_cast<int64_t>(rg.items.size()), 1, [&](int64_t i0, int64_t i1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = i0; i < i1; ++i) {
      const GroupItem& it = rg.items[static_cast<size_t>(i)];
      const Tensor w = transpose_weight ? weight.select(0, it.group) : weight.select(0, it.group).t();
      if (it.contiguous) {
        Tensor og = out.narrow(0, rg.first_row(it), it.count);
        at::mm_out(og, x.narrow(0, rg.first_row(it), it.count), w);
      } else {
        const Tensor idx = rows_t.narrow(0, it.begin, it.count);
        scatter_rows(at::mm(x.index_select(0, idx), w), rg.item_rows(it), it.count, out);
      }
    }
  });
  return out;
}

Tensor grouped_weight_grad(const Tensor& grad_y, const Tensor& x, const Tensor& group_ids, int64_t num_groups) {
  const char* op = "grouped_weight_grad";
  check_grouped_weight_grad_args(grad_y, x, group_ids, num_groups);
  check_group_values_cpu(group_ids, num_groups, op);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor out = at::zeros({num_groups, grad_y.size(1), x.size(1)}, x.options());  // empty groups: zeros
  if (x.size(0) == 0) return out;
  // One item per group: each group's gradient is one GEMM over all its rows.
  RowGroups rg = group_rows(group_ids, num_groups, std::max<int64_t>(1, x.size(0)));
  const Tensor rows_t = rows_tensor(rg);
  at::parallel_for(0, static_cast<int64_t>(rg.items.size()), 1, [&](int64_t i0, int64_t i1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = i0; i < i1; ++i) {
      const GroupItem& it = rg.items[static_cast<size_t>(i)];
      Tensor og = out.select(0, it.group);
      if (it.contiguous) {
        const int64_t first = rg.first_row(it);
        at::mm_out(og, grad_y.narrow(0, first, it.count).t(), x.narrow(0, first, it.count));
      } else {
        const Tensor idx = rows_t.narrow(0, it.begin, it.count);
        at::mm_out(og, grad_y.index_select(0, idx).t(), x.index_select(0, idx));
      }
    }
  });
  return out;
}

// ---- grouped_lora_linear: base GEMM + shrink + expand on each item's rows, gathered once ----------------

std::tuple<Tensor, Tensor> grouped_lora_linear(const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                                               const Tensor& lora_b, const Tensor& group_ids, double scale,
                                               double dropout_p, const std::optional<Tensor>& seed) {
  const char* op = "grouped_lora_linear";
  check_grouped_lora_linear_args(x, weight, lora_a, lora_b, group_ids, scale, dropout_p, seed);
  const int64_t groups = weight.size(0), m = x.size(0), k = x.size(1), n = weight.size(1), r = lora_a.size(1);
  check_group_values_cpu(group_ids, groups, op);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const Dropout drop = make_dropout(dropout_p, seed);
  Tensor y = at::empty({m, n}, x.options());
  Tensor h = at::zeros({m, r}, x.options().dtype(acc));
  if (m == 0) return {y, h};
  RowGroups rg = group_rows(group_ids, groups, kForwardItemRows);
  {  // rows with id -1: y = 0
    const int64_t* ip = group_ids.const_data_ptr<int64_t>();
    const int64_t is = group_ids.stride(0), bytes = static_cast<int64_t>(y.element_size()) * n;
    char* yp = static_cast<char*>(y.data_ptr());
    for (int64_t i = 0; i < m; ++i) {
      if (ip[i * is] < 0) std::memset(yp + i * bytes, 0, static_cast<size_t>(bytes));
    }
  }
  const Tensor rows_t = rows_tensor(rg);
  const Tensor a = adapter_as(lora_a, acc);  // [G, r, K]
  const Tensor b = adapter_as(lora_b, acc);  // [G, N, r]
  const bool wide = is_wide(x.scalar_type());
  dispatch_value_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(rg.items.size()), 1, [&](int64_t i0, int64_t i1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<A> xbuf;
      for (int64_t i = i0; i < i1; ++i) {
        const GroupItem& it = rg.items[static_cast<size_t>(i)];
        const int64_t first = rg.first_row(it), cnt = it.count, e = it.group;
        const int64_t* rows = rg.item_rows(it);
        // The item's rows of x in x's dtype, gathered once: the base GEMM's input and the shrink's source.
        const Tensor xn = it.contiguous ? x.narrow(0, first, cnt)
                                        : x.index_select(0, rows_t.narrow(0, it.begin, it.count));
        Tensor xs = xn;  // the shrink's input: widened and / or masked when needed
        if (!wide || drop.active) {
          xs = blob(xbuf, cnt, k, x.options());
          load_rows<T>(xn.const_data_ptr<T>(), row_stride(xn), col_stride(xn), cnt, k, nullptr, rows, drop,
                       xbuf.data(), nullptr);
        }
        const Tensor w_t = weight.select(0, e).t();  // [K, N]
        Tensor hg;
        if (it.contiguous) {
          hg = h.narrow(0, first, cnt);
          at::mm_out(hg, xs, a.select(0, e).t());
        } else {
          hg = at::mm(xs, a.select(0, e).t());
          scatter_rows(hg, rows, cnt, h);
        }
        const Tensor b_t = b.select(0, e).t();  // [r, N]
        if (wide) {
          if (it.contiguous) {
            Tensor yg = y.narrow(0, first, cnt);
            at::mm_out(yg, xn, w_t);
            yg.addmm_(hg, b_t, 1.0, scale);
          } else {
            Tensor yb = at::mm(xn, w_t);
            yb.addmm_(hg, b_t, 1.0, scale);
            scatter_rows(yb, rows, cnt, y);
          }
          continue;
        }
        // 16-bit values: the base product as the 16-bit GEMM rounds it (as F.linear does), widened; the
        // LoRA term added in float32; one more rounding into y (plain PyTorch rounds the LoRA term too).
        if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
          Tensor yf = at::mm(xn, w_t).to(at::kFloat);
          yf.addmm_(hg, b_t, 1.0, scale);
          const float* fp = yf.const_data_ptr<float>();
          for (int64_t j = 0; j < cnt; ++j) store_row<T>(fp + j * n, n, yp + rows[j] * n, 1);
        }
      }
    });
  });
  return {y, h};
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, CPU, m) {
  m.impl("grouped_shrink", &grouped_shrink);
  m.impl("grouped_expand_add_", &grouped_expand_add_);
  m.impl("grouped_backward", &grouped_backward);
  m.impl("grouped_mm", &grouped_mm);
  m.impl("grouped_weight_grad", &grouped_weight_grad);
  m.impl("grouped_lora_linear", &grouped_lora_linear);
}

}  // namespace cpu
}  // namespace loracuda
