// Argument checks shared by the CPU and CUDA implementations of every loracuda op.
//
// Each op's checks run before anything is allocated or written, so a rejected call leaves every
// tensor as it was. Messages name the op and the argument: "loracuda.merge_: argument 'lora_b' ...".
// Shapes use the notation of docs/design.md, section 'Math and memory passes': x [M, K],
// lora_a [R, K] with R = S * r (S slices), lora_b [N, r], y [M, N], weight [N, K] (or [K, N] when
// transposed).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <optional>
#include <vector>

// Shape or value problems raise ValueError; dtype problems raise TypeError.
#define LORACUDA_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK_VALUE(cond, "loracuda.", op, ": argument '", arg, "' ", __VA_ARGS__)
#define LORACUDA_CHECK_ARG_TYPE(cond, op, arg, ...) \
  TORCH_CHECK_TYPE(cond, "loracuda.", op, ": argument '", arg, "' ", __VA_ARGS__)

namespace loracuda {

inline bool is_kernel_dtype(at::ScalarType t, bool allow_double) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || (allow_double && t == at::kDouble);
}

// fp64 inputs (CPU only; used by gradcheck) accumulate in fp64, all others in fp32.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg, const char* shape) {
  LORACUDA_CHECK_ARG(t.dim() == dim, op, arg, "must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                              const char* ref_arg) {
  LORACUDA_CHECK_ARG(t.device() == ref.device(), op, arg, "is on ", t.device(), " but '", ref_arg, "' is on ",
                     ref.device());
}

inline void check_value_dtype(const at::Tensor& t, const char* op, const char* arg) {
  LORACUDA_CHECK_ARG_TYPE(is_kernel_dtype(t.scalar_type(), t.is_cpu()), op, arg,
                          "must be float32, bfloat16 or float16", (t.is_cpu() ? " (or float64 on CPU)" : ""),
                          ", got ", t.scalar_type());
}

// An adapter factor is stored in the activation's dtype or in float32 (fp32 master adapters).
inline void check_adapter_dtype(const at::Tensor& t, at::ScalarType value_dtype, const char* op, const char* arg,
                                const char* value_arg) {
  LORACUDA_CHECK_ARG_TYPE(t.scalar_type() == value_dtype || t.scalar_type() == at::kFloat, op, arg,
                          "must have the dtype of '", value_arg, "' (", value_dtype, ") or float32, got ",
                          t.scalar_type());
}

// A mutated output must have unit column stride; any row stride >= its width is accepted.
inline void check_row_major_output(const at::Tensor& t, const char* op, const char* arg) {
  LORACUDA_CHECK_ARG(t.size(0) <= 1 || t.size(1) <= 1 || (t.stride(1) == 1 && t.stride(0) >= t.size(1)), op, arg,
                     "must have unit stride along its last dimension (rows may be strided); got strides ",
                     t.strides(), " for shape ", t.sizes());
}

// The scale policy of every op: a scalar scale must be finite as a float32 (the kernels multiply in
// float32; 1e39 is finite as a double but inf as a float32 and would write inf / NaN). NaN and
// infinities are refused, never propagated.
inline bool finite_as_float32(double v) { return std::isfinite(v) && std::fabs(v) <= 3.4028234663852886e38; }

inline void check_finite_scalar(double v, const char* op, const char* arg) {
  LORACUDA_CHECK_ARG(finite_as_float32(v), op, arg, "must be finite as a float32 (|", arg,
                     "| <= 3.4028235e38), got ", v);
}

// ---- memory overlap ----------------------------------------------------------------------------
// The one overlap rule of every op that writes into an argument (checked before anything is written):
// (1) no two elements of a written tensor share memory (an expand()ed view, stride 0, or strides
// that interleave), and (2) a written tensor shares no memory with any other tensor argument, in or
// out. Kernels read inputs while they write outputs, in an order that depends on tiles and threads,
// so an overlap would give schedule-dependent results (or, for the restore codes, corrupt memory).
// The tests are exact where that is cheap and conservative otherwise: a layout they cannot prove
// free of overlap is refused, with a message that says how to pass one (a .clone()).

// True unless the elements of `t` provably occupy distinct memory: the dimensions of size > 1, by
// increasing stride, must each step over everything the smaller ones span.
inline bool may_overlap_itself(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) in elements, sizes > 1 only
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // the largest offset the dimensions so far reach, in elements
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;  // stride 0 (expand) included
    span += stride * (size - 1);
  }
  return false;
}

inline void check_no_self_overlap(const at::Tensor& t, const char* op, const char* arg) {
  LORACUDA_CHECK_ARG(!may_overlap_itself(t), op, arg,
                     "is written by this op but has elements that share memory (strides ", t.strides(),
                     " for shape ", t.sizes(),
                     ": an expand()ed, stride-0 or overlapping view); pass a tensor with one memory location per "
                     "element (e.g. .clone())");
}

namespace detail {

// Where a non-empty tensor lies in memory, in bytes: [begin, end) holds every element, and when
// `pitch` > 0 the tensor is rows of `width` bytes that start `pitch` bytes apart (2-D, rows not
// wider than the pitch), so that column slices of one buffer can be told apart.
struct Footprint {
  uintptr_t begin = 0, end = 0;
  int64_t pitch = 0, width = 0;
};

inline Footprint footprint(const at::Tensor& t) {
  const int64_t item = static_cast<int64_t>(t.element_size());
  int64_t extent = 0;  // offset of the last element, in elements
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  Footprint f;
  f.begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  f.end = f.begin + static_cast<uintptr_t>((extent + 1) * item);
  f.width = static_cast<int64_t>(f.end - f.begin);  // one segment, unless rows are found below
  if (t.dim() == 2 && t.size(0) > 1) {
    const int64_t width = ((t.size(1) - 1) * t.stride(1) + 1) * item;
    if (width <= t.stride(0) * item) {
      f.pitch = t.stride(0) * item;
      f.width = width;
    }
  }
  return f;
}

// Do the rows of `rows` (pitch > 0) miss the segment [s, s + width) of `other`? Only when `other` is one
// segment or has the same pitch, and its bytes fall, modulo the pitch, in the gap between rows.
inline bool rows_miss(const Footprint& rows, const Footprint& other) {
  if (other.pitch != 0 && other.pitch != rows.pitch) return false;
  if (other.pitch == 0 && other.width > rows.pitch) return false;
  const int64_t p = rows.pitch;
  const int64_t diff = static_cast<int64_t>(other.begin) - static_cast<int64_t>(rows.begin);
  const int64_t d = ((diff % p) + p) % p;  // where `other` starts within a row pitch of `rows`
  return d >= rows.width && d + other.width <= p;
}

}  // namespace detail

// True unless `a` and `b` provably share no byte: different devices, disjoint address ranges, or
// row-interleaved column slices of one buffer (same row pitch, disjoint columns). Addresses, not
// storage objects, decide: two storages made over one buffer (torch.frombuffer, from_blob) alias too.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.has_storage() || !b.has_storage() || a.device() != b.device()) return false;
  const detail::Footprint fa = detail::footprint(a), fb = detail::footprint(b);
  if (fa.end <= fb.begin || fb.end <= fa.begin) return false;
  if (fa.pitch > 0 && detail::rows_miss(fa, fb)) return false;
  if (fb.pitch > 0 && detail::rows_miss(fb, fa)) return false;
  return true;
}

// A tensor the op writes, and every other tensor argument (name, tensor; absent ones undefined).
using NamedTensor = std::pair<const char*, const at::Tensor*>;

inline void check_written_alone(const at::Tensor& written, const char* written_arg,
                                std::initializer_list<NamedTensor> others, const char* op) {
  check_no_self_overlap(written, op, written_arg);
  for (const auto& [name, t] : others) {
    if (t == nullptr || !t->defined()) continue;
    LORACUDA_CHECK_ARG(!may_share_memory(written, *t), op, name, "shares memory with '", written_arg,
                       "', which this op writes; pass separate tensors (e.g. .clone() one of them)");
  }
}

inline const at::Tensor* optional_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// dropout_p in [0, 1); when p > 0 the seed is an int64 tensor with one element, on the CPU or on
// the device of the activations.
inline void check_dropout(double p, const std::optional<at::Tensor>& seed, const at::Tensor& x, const char* op) {
  LORACUDA_CHECK_ARG(p >= 0.0 && p < 1.0, op, "dropout_p", "must be in [0, 1), got ", p);
  if (p > 0.0) {
    LORACUDA_CHECK_ARG(seed.has_value(), op, "seed", "is required when dropout_p > 0");
  }
  if (seed.has_value()) {
    const at::Tensor& s = *seed;
    LORACUDA_CHECK_ARG_TYPE(s.scalar_type() == at::kLong, op, "seed", "must be an int64 tensor, got ",
                            s.scalar_type());
    LORACUDA_CHECK_ARG(s.numel() == 1, op, "seed", "must have exactly one element, got shape ", s.sizes());
    LORACUDA_CHECK_ARG(s.is_cpu() || s.device() == x.device(), op, "seed", "must be on the CPU or on ", x.device(),
                       ", got ", s.device());
  }
}

// Slice layout of a fused projection (q, k, v in one output): slice i reads h columns
// [i * r, (i + 1) * r) and writes y columns [offsets[i], offsets[i + 1]). An empty list is one slice.
inline std::vector<int64_t> check_slice_offsets(at::IntArrayRef slice_offsets, int64_t n, const char* op) {
  if (slice_offsets.empty()) return {0, n};
  LORACUDA_CHECK_ARG(slice_offsets.size() >= 2, op, "slice_offsets",
                     "must be empty or hold S + 1 column offsets, got ", slice_offsets);
  LORACUDA_CHECK_ARG(slice_offsets.front() == 0 && slice_offsets.back() == n, op, "slice_offsets",
                     "must start at 0 and end at N = ", n, ", got ", slice_offsets);
  for (size_t i = 1; i < slice_offsets.size(); ++i) {
    LORACUDA_CHECK_ARG(slice_offsets[i] > slice_offsets[i - 1], op, "slice_offsets", "must be strictly increasing, got ",
                       slice_offsets);
  }
  return slice_offsets.vec();
}

// ---- per-op checks ----------------------------------------------------------------------------

// shrink: x [M, K], lora_a [R, K].
// `op` names the caller in messages (lora_linear reuses these checks).
inline void check_shrink_args(const at::Tensor& x, const at::Tensor& lora_a, double dropout_p,
                              const std::optional<at::Tensor>& seed, const char* op = "shrink") {
  check_dim(x, 2, op, "x", "[M, K]");
  check_dim(lora_a, 2, op, "lora_a", "[R, K]");
  check_value_dtype(x, op, "x");
  check_adapter_dtype(lora_a, x.scalar_type(), op, "lora_a", "x");
  check_same_device(lora_a, x, op, "lora_a", "x");
  LORACUDA_CHECK_ARG(x.size(1) >= 1, op, "x", "must have K >= 1 columns, got shape ", x.sizes());
  LORACUDA_CHECK_ARG(lora_a.size(0) >= 1, op, "lora_a", "must have rank R >= 1 rows, got shape ", lora_a.sizes());
  LORACUDA_CHECK_ARG(lora_a.size(1) == x.size(1), op, "lora_a", "must be [R, K] with K = ", x.size(1),
                     " (from 'x'), got shape ", lora_a.sizes());
  check_dropout(dropout_p, seed, x, op);
}

// expand_add_: y [M, N] += scale * h [M, S*r] (slice-wise) @ lora_b [N, r]^T. Returns the offsets.
inline std::vector<int64_t> check_expand_add_args(const at::Tensor& y, const at::Tensor& h, const at::Tensor& lora_b,
                                                  double scale, at::IntArrayRef slice_offsets) {
  const char* op = "expand_add_";
  check_dim(y, 2, op, "y", "[M, N]");
  check_dim(h, 2, op, "h", "[M, S*r]");
  check_dim(lora_b, 2, op, "lora_b", "[N, r]");
  check_value_dtype(y, op, "y");
  LORACUDA_CHECK_ARG_TYPE(h.scalar_type() == accumulate_dtype(y.scalar_type()), op, "h", "must be ",
                          accumulate_dtype(y.scalar_type()), " (the accumulation dtype for 'y' of dtype ",
                          y.scalar_type(), "), got ", h.scalar_type());
  check_adapter_dtype(lora_b, y.scalar_type(), op, "lora_b", "y");
  check_same_device(h, y, op, "h", "y");
  check_same_device(lora_b, y, op, "lora_b", "y");
  check_finite_scalar(scale, op, "scale");
  check_row_major_output(y, op, "y");
  const int64_t n = y.size(1);
  LORACUDA_CHECK_ARG(lora_b.size(0) == n, op, "lora_b", "must be [N, r] with N = ", n, " (from 'y'), got shape ",
                     lora_b.sizes());
  LORACUDA_CHECK_ARG(lora_b.size(1) >= 1, op, "lora_b", "must have rank r >= 1 columns, got shape ", lora_b.sizes());
  LORACUDA_CHECK_ARG(h.size(0) == y.size(0), op, "h", "must have M = ", y.size(0), " rows (from 'y'), got shape ",
                     h.sizes());
  auto offsets = check_slice_offsets(slice_offsets, n, op);
  const int64_t slices = static_cast<int64_t>(offsets.size()) - 1;
  LORACUDA_CHECK_ARG(h.size(1) == slices * lora_b.size(1), op, "h", "must have S * r = ", slices, " * ",
                     lora_b.size(1), " columns, got shape ", h.sizes());
  check_written_alone(y, "y", {{"h", &h}, {"lora_b", &lora_b}}, op);
  return offsets;
}

// merge_ / restore_codes / unmerge_exact_: weight [N, K] (or [K, N] when transposed),
// lora_a [r, K], lora_b [N, r], both in the weight's dtype or float32.
inline void check_merge_args(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             double scale, bool transposed, const char* op) {
  check_dim(weight, 2, op, "weight", transposed ? "[K, N]" : "[N, K]");
  check_dim(lora_a, 2, op, "lora_a", "[r, K]");
  check_dim(lora_b, 2, op, "lora_b", "[N, r]");
  check_value_dtype(weight, op, "weight");
  check_adapter_dtype(lora_a, weight.scalar_type(), op, "lora_a", "weight");
  LORACUDA_CHECK_ARG_TYPE(lora_b.scalar_type() == lora_a.scalar_type(), op, "lora_b", "must have the dtype of 'lora_a' (",
                          lora_a.scalar_type(), "), got ", lora_b.scalar_type());
  check_same_device(lora_a, weight, op, "lora_a", "weight");
  check_same_device(lora_b, weight, op, "lora_b", "weight");
  check_finite_scalar(scale, op, "scale");
  LORACUDA_CHECK_ARG(weight.is_contiguous(), op, "weight", "must be contiguous (it is updated in place), got strides ",
                     weight.strides(), " for shape ", weight.sizes());
  const int64_t n = transposed ? weight.size(1) : weight.size(0);
  const int64_t k = transposed ? weight.size(0) : weight.size(1);
  LORACUDA_CHECK_ARG(lora_a.size(0) >= 1, op, "lora_a", "must have rank r >= 1 rows, got shape ", lora_a.sizes());
  LORACUDA_CHECK_ARG(lora_a.size(1) == k, op, "lora_a", "must be [r, K] with K = ", k, " (from 'weight'",
                     (transposed ? ", transposed" : ""), "), got shape ", lora_a.sizes());
  LORACUDA_CHECK_ARG(lora_b.size(0) == n && lora_b.size(1) == lora_a.size(0), op, "lora_b", "must be [N, r] = [", n,
                     ", ", lora_a.size(0), "], got shape ", lora_b.sizes());
}

// merge_, merge_exact_, unmerge_exact_ write the weight: it must share no memory with the factors, the
// codes or the escape values (restore_codes only reads, and its codes are a fresh tensor).
inline void check_merge_written(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor* codes, const at::Tensor* escape_values, const char* op) {
  check_written_alone(weight, "weight",
                      {{"lora_a", &lora_a}, {"lora_b", &lora_b}, {"codes", codes}, {"escape_values", escape_values}},
                      op);
}

// The restore record of an exact merge: 2 bits per weight element, 4 elements per byte.
inline int64_t restore_code_bytes(int64_t numel) { return (numel + 3) / 4; }

inline void check_restore_codes(const at::Tensor& weight, const at::Tensor& codes, const char* op) {
  LORACUDA_CHECK_ARG_TYPE(codes.scalar_type() == at::kByte, op, "codes", "must be uint8, got ", codes.scalar_type());
  check_same_device(codes, weight, op, "codes", "weight");
  LORACUDA_CHECK_ARG(codes.dim() == 1 && codes.size(0) == restore_code_bytes(weight.numel()) && codes.is_contiguous(),
                     op, "codes", "must be a contiguous 1-D tensor of ", restore_code_bytes(weight.numel()),
                     " bytes (2 bits per element of 'weight'), got shape ", codes.sizes());
}

// unmerge_exact_'s escape_values: the saved original values of the code-3 elements, 1-D, in the
// weight's dtype and on its device. Its length is checked against the codes by check_escape_count.
inline void check_escape_values(const at::Tensor& weight, const at::Tensor& values, const char* op) {
  LORACUDA_CHECK_ARG_TYPE(values.scalar_type() == weight.scalar_type(), op, "escape_values",
                          "must have the dtype of 'weight' (", weight.scalar_type(), "), got ", values.scalar_type());
  check_same_device(values, weight, op, "escape_values", "weight");
  LORACUDA_CHECK_ARG(values.dim() == 1, op, "escape_values", "must be 1-D, got shape ", values.sizes());
}

inline void check_escape_count(const at::Tensor& values, int64_t escapes, const char* op) {
  LORACUDA_CHECK_ARG(values.size(0) == escapes, op, "escape_values", "must hold one value per code-3 element of 'codes' (",
                     escapes, "), got ", values.size(0));
}

// merge_exact_'s record: code bytes + escapes * element bytes; a negative limit means none.
inline bool record_fits(int64_t code_bytes, int64_t escapes, int64_t element_bytes, int64_t max_record_bytes) {
  return max_record_bytes < 0 || code_bytes + escapes * element_bytes <= max_record_bytes;
}

inline void check_record_bytes(int64_t code_bytes, int64_t escapes, int64_t element_bytes, int64_t max_record_bytes,
                               const char* op) {
  LORACUDA_CHECK_ARG(record_fits(code_bytes, escapes, element_bytes, max_record_bytes), op, "max_record_bytes",
                     "is ", max_record_bytes, " bytes but the restore record needs ",
                     code_bytes + escapes * element_bytes, " (", code_bytes, " bytes of codes + ", escapes,
                     " code-3 elements * ", element_bytes, " bytes); the weight is unchanged");
}

// grad_x [M, K] of a backward op, written in place: x's dtype, device and shape, rows of unit stride,
// and no memory shared with itself or with any of ``inputs`` (the tensors the op reads).
inline void check_grad_x(const at::Tensor& gx, const at::Tensor& x, std::initializer_list<NamedTensor> inputs,
                         const char* op) {
  const int64_t m = x.size(0), k = x.size(1);
  check_dim(gx, 2, op, "grad_x", "[M, K]");
  LORACUDA_CHECK_ARG_TYPE(gx.scalar_type() == x.scalar_type(), op, "grad_x", "must have the dtype of 'x' (",
                          x.scalar_type(), "), got ", gx.scalar_type());
  check_same_device(gx, x, op, "grad_x", "x");
  LORACUDA_CHECK_ARG(gx.size(0) == m && gx.size(1) == k, op, "grad_x", "must be [M, K] = [", m, ", ", k,
                     "], got shape ", gx.sizes());
  check_row_major_output(gx, op, "grad_x");
  check_written_alone(gx, "grad_x", inputs, op);
}

// backward: grad_y [M, N], x [M, K], h [M, R], lora_a [R, K], lora_b [N, r], grad_x [M, K] or None.
// Returns the slice offsets.
inline std::vector<int64_t> check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                double dropout_p, const std::optional<at::Tensor>& seed,
                                                at::IntArrayRef slice_offsets,
                                                const std::optional<at::Tensor>& grad_x) {
  const char* op = "backward";
  check_dim(grad_y, 2, op, "grad_y", "[M, N]");
  check_dim(x, 2, op, "x", "[M, K]");
  check_dim(h, 2, op, "h", "[M, R]");
  check_dim(lora_a, 2, op, "lora_a", "[R, K]");
  check_dim(lora_b, 2, op, "lora_b", "[N, r]");
  check_value_dtype(x, op, "x");
  LORACUDA_CHECK_ARG_TYPE(grad_y.scalar_type() == x.scalar_type(), op, "grad_y", "must have the dtype of 'x' (",
                          x.scalar_type(), "), got ", grad_y.scalar_type());
  LORACUDA_CHECK_ARG_TYPE(h.scalar_type() == accumulate_dtype(x.scalar_type()), op, "h", "must be ",
                          accumulate_dtype(x.scalar_type()), ", got ", h.scalar_type());
  check_adapter_dtype(lora_a, x.scalar_type(), op, "lora_a", "x");
  check_adapter_dtype(lora_b, x.scalar_type(), op, "lora_b", "x");
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{grad_y, "grad_y"}, {h, "h"}, {lora_a, "lora_a"},
                         {lora_b, "lora_b"}}) {
    check_same_device(t, x, op, name, "x");
  }
  check_finite_scalar(scale, op, "scale");
  const int64_t m = x.size(0), k = x.size(1), n = grad_y.size(1);
  LORACUDA_CHECK_ARG(grad_y.size(0) == m, op, "grad_y", "must have M = ", m, " rows (from 'x'), got shape ",
                     grad_y.sizes());
  LORACUDA_CHECK_ARG(k >= 1, op, "x", "must have K >= 1 columns, got shape ", x.sizes());
  LORACUDA_CHECK_ARG(lora_a.size(1) == k && lora_a.size(0) >= 1, op, "lora_a", "must be [R, K] with K = ", k,
                     ", got shape ", lora_a.sizes());
  LORACUDA_CHECK_ARG(h.size(0) == m && h.size(1) == lora_a.size(0), op, "h", "must be [M, R] = [", m, ", ",
                     lora_a.size(0), "], got shape ", h.sizes());
  LORACUDA_CHECK_ARG(lora_b.size(0) == n && lora_b.size(1) >= 1, op, "lora_b", "must be [N, r] with N = ", n,
                     " (from 'grad_y'), got shape ", lora_b.sizes());
  auto offsets = check_slice_offsets(slice_offsets, n, op);
  const int64_t slices = static_cast<int64_t>(offsets.size()) - 1;
  LORACUDA_CHECK_ARG(lora_a.size(0) == slices * lora_b.size(1), op, "lora_a", "must have S * r = ", slices, " * ",
                     lora_b.size(1), " rows, got shape ", lora_a.sizes());
  check_dropout(dropout_p, seed, x, op);
  if (grad_x.has_value()) {
    check_grad_x(*grad_x, x,
                 {{"grad_y", &grad_y}, {"x", &x}, {"h", &h}, {"lora_a", &lora_a}, {"lora_b", &lora_b},
                  {"seed", optional_ptr(seed)}},
                 op);
  }
  return offsets;
}

// ---- multi-LoRA serving ------------------------------------------------------------------------
// Stacked adapters: lora_a_all [L, S*r_max, K], lora_b_all [L, N, r_max] (contiguous, in the activations'
// dtype or float32), ranks int32 [L], scales float32 [L], adapter_ids int32 [M]; all on x's device.
// Values of ranks and adapter_ids are checked by the CPU kernels only (reading them on CUDA would be a
// host synchronisation; the CUDA kernels clamp ranks to r_max and treat ids outside [0, L) as -1).

inline void check_adapter_table(const at::Tensor& t, int64_t num_adapters, at::ScalarType dtype, const char* dtype_name,
                                const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg) {
  check_dim(t, 1, op, arg, "[L]");
  LORACUDA_CHECK_ARG_TYPE(t.scalar_type() == dtype, op, arg, "must be ", dtype_name, ", got ", t.scalar_type());
  LORACUDA_CHECK_ARG(t.size(0) == num_adapters, op, arg, "must have L = ", num_adapters, " entries, got shape ",
                     t.sizes());
  LORACUDA_CHECK_ARG(t.is_contiguous(), op, arg, "must be contiguous");
  check_same_device(t, ref, op, arg, ref_arg);
}

inline void check_adapter_ids(const at::Tensor& ids, int64_t m, const at::Tensor& ref, const char* op,
                              const char* ref_arg) {
  check_dim(ids, 1, op, "adapter_ids", "[M]");
  LORACUDA_CHECK_ARG_TYPE(ids.scalar_type() == at::kInt, op, "adapter_ids", "must be int32, got ", ids.scalar_type());
  LORACUDA_CHECK_ARG(ids.size(0) == m, op, "adapter_ids", "must have M = ", m, " entries (one per row of '", ref_arg,
                     "'), got shape ", ids.sizes());
  LORACUDA_CHECK_ARG(ids.is_contiguous(), op, "adapter_ids", "must be contiguous");
  check_same_device(ids, ref, op, "adapter_ids", ref_arg);
}

// multi_shrink: x [M, K], lora_a_all [L, S*r_max, K].
inline void check_multi_shrink_args(const at::Tensor& x, const at::Tensor& lora_a_all, const at::Tensor& ranks,
                                    const at::Tensor& adapter_ids, int64_t num_slices) {
  const char* op = "multi_shrink";
  check_dim(x, 2, op, "x", "[M, K]");
  check_dim(lora_a_all, 3, op, "lora_a_all", "[L, S*r_max, K]");
  check_value_dtype(x, op, "x");
  check_adapter_dtype(lora_a_all, x.scalar_type(), op, "lora_a_all", "x");
  check_same_device(lora_a_all, x, op, "lora_a_all", "x");
  LORACUDA_CHECK_ARG(lora_a_all.is_contiguous(), op, "lora_a_all", "must be contiguous");
  LORACUDA_CHECK_ARG(x.size(1) >= 1, op, "x", "must have K >= 1 columns, got shape ", x.sizes());
  LORACUDA_CHECK_ARG(lora_a_all.size(0) >= 1 && lora_a_all.size(1) >= 1 && lora_a_all.size(2) == x.size(1), op,
                     "lora_a_all", "must be [L, S*r_max, K] with L >= 1 and K = ", x.size(1), " (from 'x'), got shape ",
                     lora_a_all.sizes());
  LORACUDA_CHECK_ARG(num_slices >= 1 && lora_a_all.size(1) % num_slices == 0, op, "num_slices",
                     "must be >= 1 and divide S*r_max = ", lora_a_all.size(1), ", got ", num_slices);
  check_adapter_table(ranks, lora_a_all.size(0), at::kInt, "int32", x, op, "ranks", "x");
  check_adapter_ids(adapter_ids, x.size(0), x, op, "x");
}

// multi_expand_add_: y [M, N] += h [M, S*r_max] (per token's adapter) @ lora_b_all [L, N, r_max]. Returns the
// slice offsets.
inline std::vector<int64_t> check_multi_expand_add_args(const at::Tensor& y, const at::Tensor& h,
                                                        const at::Tensor& lora_b_all, const at::Tensor& scales,
                                                        const at::Tensor& ranks, const at::Tensor& adapter_ids,
                                                        at::IntArrayRef slice_offsets) {
  const char* op = "multi_expand_add_";
  check_dim(y, 2, op, "y", "[M, N]");
  check_dim(h, 2, op, "h", "[M, S*r_max]");
  check_dim(lora_b_all, 3, op, "lora_b_all", "[L, N, r_max]");
  check_value_dtype(y, op, "y");
  LORACUDA_CHECK_ARG_TYPE(h.scalar_type() == accumulate_dtype(y.scalar_type()), op, "h", "must be ",
                          accumulate_dtype(y.scalar_type()), " (the accumulation dtype for 'y' of dtype ",
                          y.scalar_type(), "), got ", h.scalar_type());
  check_adapter_dtype(lora_b_all, y.scalar_type(), op, "lora_b_all", "y");
  check_same_device(h, y, op, "h", "y");
  check_same_device(lora_b_all, y, op, "lora_b_all", "y");
  LORACUDA_CHECK_ARG(lora_b_all.is_contiguous(), op, "lora_b_all", "must be contiguous");
  check_row_major_output(y, op, "y");
  const int64_t n = y.size(1);
  LORACUDA_CHECK_ARG(lora_b_all.size(0) >= 1 && lora_b_all.size(1) == n && lora_b_all.size(2) >= 1, op, "lora_b_all",
                     "must be [L, N, r_max] with L >= 1 and N = ", n, " (from 'y'), got shape ", lora_b_all.sizes());
  LORACUDA_CHECK_ARG(h.size(0) == y.size(0), op, "h", "must have M = ", y.size(0), " rows (from 'y'), got shape ",
                     h.sizes());
  auto offsets = check_slice_offsets(slice_offsets, n, op);
  const int64_t slices = static_cast<int64_t>(offsets.size()) - 1;
  LORACUDA_CHECK_ARG(h.size(1) == slices * lora_b_all.size(2), op, "h", "must have S * r_max = ", slices, " * ",
                     lora_b_all.size(2), " columns, got shape ", h.sizes());
  const int64_t adapters = lora_b_all.size(0);
  check_adapter_table(scales, adapters, at::kFloat, "float32", y, op, "scales", "y");
  check_adapter_table(ranks, adapters, at::kInt, "int32", y, op, "ranks", "y");
  check_adapter_ids(adapter_ids, y.size(0), y, op, "y");
  check_written_alone(y, "y",
                      {{"h", &h}, {"lora_b_all", &lora_b_all}, {"scales", &scales}, {"ranks", &ranks},
                       {"adapter_ids", &adapter_ids}},
                      op);
  return offsets;
}

// CPU only: every rank in [0, r_max] and every id in [-1, L).
inline void check_multi_values_cpu(const at::Tensor& ranks, int64_t r_max, const at::Tensor& adapter_ids,
                                   const char* op) {
  const int32_t* rp = ranks.const_data_ptr<int32_t>();
  for (int64_t l = 0; l < ranks.size(0); ++l) {
    LORACUDA_CHECK_ARG(rp[l] >= 0 && rp[l] <= r_max, op, "ranks", "must hold ranks in [0, r_max = ", r_max,
                       "], got ", rp[l], " for adapter ", l);
  }
  const int32_t* ip = adapter_ids.const_data_ptr<int32_t>();
  for (int64_t m = 0; m < adapter_ids.size(0); ++m) {
    LORACUDA_CHECK_ARG(ip[m] >= -1 && ip[m] < ranks.size(0), op, "adapter_ids", "must hold ids in [-1, L = ",
                       ranks.size(0), "), got ", ip[m], " at row ", m);
  }
}

// CPU only: the scale of every adapter a token uses must be finite (the policy of check_finite_scalar
// for the scalar scale of the other ops). CUDA kernels cannot read the table without a host
// synchronisation; there a non-finite scale propagates into its tokens' rows, as in the reference.
inline void check_multi_scales_cpu(const at::Tensor& scales, const at::Tensor& adapter_ids, const char* op) {
  const float* sp = scales.const_data_ptr<float>();
  const int32_t* ip = adapter_ids.const_data_ptr<int32_t>();
  for (int64_t m = 0; m < adapter_ids.size(0); ++m) {
    if (ip[m] < 0) continue;
    LORACUDA_CHECK_ARG(std::isfinite(sp[ip[m]]), op, "scales", "must be finite for every adapter a token uses, got ",
                       sp[ip[m]], " for adapter ", ip[m], " (used by row ", m, ")");
  }
}

// The seed value when it lives on the CPU (a device seed is read by the kernel itself).
inline uint64_t host_seed(const std::optional<at::Tensor>& seed) {
  return seed.has_value() && seed->is_cpu() ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
}

}  // namespace loracuda
