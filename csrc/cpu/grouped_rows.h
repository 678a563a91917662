// The rows of a grouped op sorted by group, and split into work items, for the CPU kernels of
// csrc/cpu/grouped.cpp.
//
// One counting sort of group_ids (O(M + G)) gives every group's rows in ascending order. Each group is
// then cut into items of at most `chunk_rows` rows; an item is the unit of parallel work (a GEMM on its
// rows). The cut depends on the ids and the chunk size only, never on the thread count, so a reduction
// done per item and then summed over a group's items in order repeats bit for bit.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace loracuda {
namespace cpu {

struct GroupItem {
  int64_t group;
  int64_t begin;    // offset of its first row in RowGroups::rows
  int64_t count;    // rows, >= 1
  bool contiguous;  // its rows are consecutive: rows[begin] .. rows[begin] + count - 1
  int64_t first_item_of_group;  // index of the group's first item (items of a group are consecutive)
  int64_t items_in_group;
};

struct RowGroups {
  std::vector<int64_t> start;  // [G + 1]: group g's rows are rows[start[g] .. start[g + 1])
  std::vector<int64_t> rows;   // the rows with id >= 0, group by group, ascending within a group
  std::vector<GroupItem> items;

  int64_t first_row(const GroupItem& it) const { return rows[static_cast<size_t>(it.begin)]; }
  const int64_t* item_rows(const GroupItem& it) const { return rows.data() + it.begin; }
};

// ids: int64 [M] (any stride) with values already checked to lie in [-1, groups).
inline RowGroups group_rows(const at::Tensor& ids, int64_t groups, int64_t chunk_rows) {
  const int64_t m = ids.size(0);
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  const int64_t is = ids.stride(0);
  RowGroups g;
  g.start.assign(static_cast<size_t>(groups + 1), 0);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t id = ip[i * is];
    if (id >= 0) ++g.start[static_cast<size_t>(id + 1)];
  }
  for (int64_t e = 0; e < groups; ++e) g.start[e + 1] += g.start[e];
  g.rows.resize(static_cast<size_t>(g.start[groups]));
  std::vector<int64_t> next(g.start.begin(), g.start.end() - 1);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t id = ip[i * is];
    if (id >= 0) g.rows[static_cast<size_t>(next[id]++)] = i;
  }
  for (int64_t e = 0; e < groups; ++e) {
    const int64_t b = g.start[e], n = g.start[e + 1] - b;
    if (n == 0) continue;
    const int64_t first_item = static_cast<int64_t>(g.items.size());
    const int64_t pieces = (n + chunk_rows - 1) / chunk_rows;
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t o = b + p * chunk_rows, c = std::min(chunk_rows, b + n - o);
      const bool contiguous = g.rows[static_cast<size_t>(o + c - 1)] - g.rows[static_cast<size_t>(o)] == c - 1;
      g.items.push_back({e, o, c, contiguous, first_item, pieces});
    }
  }
  return g;
}

}  // namespace cpu
}  // namespace loracuda
