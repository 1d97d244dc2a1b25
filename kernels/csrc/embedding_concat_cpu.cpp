// CPU kernels of embedding_concat: forward writes each event's concatenated row in one pass;
// backward accumulates gradients in float32 (float64 for float64 tables) without locks or atomics.
//
// Parallelism is at::parallel_for (OpenMP, sharing torch's thread pool and torch.set_num_threads), one
// parallel region per call. Backward splits the work into P partitions and picks, per feature:
//   * partials  (small tables, e.g. a 10-row rating table hit by every event): each partition of the
//     events accumulates into its own [V, D] buffer, and the P buffers are summed afterwards. Hot rows
//     never serialize and the extra memory is P * V * D floats (kept small by the choice rule).
//   * ownership (large tables, e.g. 100k items): partition p owns the row blocks b with b % P == p and scans
//     all events, accumulating only its own rows, so no two threads write the same row and no [V, D] buffer
//     is duplicated. Load is balanced unless one row takes more than 1/P of all hits, which the partials
//     strategy covers for the small tables where that happens.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>

#include "embedding_concat.h"

namespace userllm {
namespace {

inline int64_t load_id(const void* ids, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(ids)[i] : static_cast<const int32_t*>(ids)[i];
}

// Lowest feature index that had an out-of-range id (features are reported in order, as the reference does).
struct BadFeature {
  std::atomic<int64_t> index{std::numeric_limits<int64_t>::max()};
  void report(int64_t f) {
    int64_t cur = index.load(std::memory_order_relaxed);
    while (f < cur && !index.compare_exchange_weak(cur, f, std::memory_order_relaxed)) {
    }
  }
  void raise_if_any(at::TensorList ids, c10::IntArrayRef rows) const {
    const int64_t f = index.load();
    if (f != std::numeric_limits<int64_t>::max()) throw_out_of_range(f, ids[f].max().item<int64_t>(), rows[f]);
  }
};

struct Inputs {
  std::vector<FeatureInfo> feats;
  std::vector<at::Tensor> ids;  // contiguous
  std::vector<const void*> id_ptrs;
  std::vector<bool> id64;
  int64_t events = 0, total_dim = 0;
};

Inputs prepare(at::TensorList ids, c10::IntArrayRef rows, c10::IntArrayRef dims, const std::string& pooling) {
  Inputs in;
  in.feats = check_and_describe(ids, rows, dims, pooling, &in.events, &in.total_dim);
  for (const auto& x : ids) {
    in.ids.push_back(x.contiguous());
    in.id_ptrs.push_back(in.ids.back().data_ptr());
    in.id64.push_back(x.scalar_type() == at::kLong);
  }
  return in;
}

template <typename scalar_t>
void forward_kernel(const Inputs& in, const std::vector<const scalar_t*>& tables, scalar_t* out, bool mean,
                    BadFeature& bad) {
  const int64_t F = static_cast<int64_t>(in.feats.size());
  int64_t work = 0, max_dim = 0;
  for (const auto& f : in.feats) {
    work += f.k * f.dim;
    max_dim = std::max(max_dim, f.dim);
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, in.events, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(max_dim);
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* row_out = out + n * in.total_dim;
      for (int64_t fi = 0; fi < F; ++fi) {
        const FeatureInfo& f = in.feats[fi];
        scalar_t* __restrict__ o = row_out + f.offset;
        const scalar_t* table = tables[fi];
        if (!f.multi) {
          // One id per event: a straight row copy (zero bits are 0.0 in every float format).
          const int64_t id = load_id(in.id_ptrs[fi], in.id64[fi], n);
          if (id >= 0 && id < f.rows) {
            std::memcpy(o, table + id * f.dim, f.dim * sizeof(scalar_t));
          } else {
            if (id >= f.rows) bad.report(fi);
            std::memset(o, 0, f.dim * sizeof(scalar_t));
          }
          continue;
        }
        acc_t* __restrict__ a = acc.data();
        std::fill(a, a + f.dim, acc_t(0));
        int64_t count = 0;
        for (int64_t k = 0; k < f.k; ++k) {
          const int64_t id = load_id(in.id_ptrs[fi], in.id64[fi], n * f.k + k);
          if (id < 0) continue;
          if (id >= f.rows) {
            bad.report(fi);
            continue;
          }
          const scalar_t* __restrict__ src = table + id * f.dim;
          for (int64_t d = 0; d < f.dim; ++d) a[d] += static_cast<acc_t>(src[d]);
          ++count;
        }
        const acc_t scale = (mean && count > 0) ? acc_t(1) / static_cast<acc_t>(count) : acc_t(1);
        for (int64_t d = 0; d < f.dim; ++d) o[d] = static_cast<scalar_t>(a[d] * scale);
      }
    }
  });
}

at::Tensor embedding_concat_cpu(at::TensorList ids, at::TensorList tables, std::string pooling) {
  TORCH_CHECK_VALUE(ids.size() == tables.size(), "embedding_concat: got ", ids.size(), " id tensors but ",
                    tables.size(), " tables");
  std::vector<int64_t> rows, dims;
  for (size_t f = 0; f < tables.size(); ++f) {
    const at::Tensor& t = tables[f];
    TORCH_CHECK_VALUE(t.dim() == 2, "embedding_concat: tables[", f, "] must be [V, D], got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == tables[0].scalar_type(), "embedding_concat: tables[", f, "] is ",
                     t.scalar_type(), " but tables[0] is ", tables[0].scalar_type());
    TORCH_CHECK(t.device().is_cpu() && ids[f].device().is_cpu(), "embedding_concat (CPU): feature ", f,
                " has ids on ", ids[f].device(), " and table on ", t.device());
    rows.push_back(t.size(0));
    dims.push_back(t.size(1));
  }
  Inputs in = prepare(ids, rows, dims, pooling);
  const bool mean = is_mean(pooling);
  std::vector<at::Tensor> tabs;
  for (const auto& t : tables) tabs.push_back(t.contiguous());
  at::Tensor out = at::empty({ids[0].size(0), ids[0].size(1), in.total_dim}, tables[0].options());
  BadFeature bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "embedding_concat_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& t : tabs) ptrs.push_back(t.const_data_ptr<scalar_t>());
    forward_kernel<scalar_t>(in, ptrs, out.mutable_data_ptr<scalar_t>(), mean, bad);
  });
  bad.raise_if_any(ids, rows);
  return out;
}

// Rows are owned in blocks of kRowBlock (interleaved over the partitions), so that a partition can zero and
// convert its own rows inside the same parallel region that accumulates them.
constexpr int64_t kRowBlock = 16;

// Per-feature backward plan. Partials when the P per-partition copies of the table are small (they are summed
// serially afterwards) and the table is hit more often than it has rows (so rows are hot); otherwise ownership.
struct GradPlan {
  bool partials = false;
  at::Tensor acc;     // opmath dtype: [P, V, D] (partials) or [V, D] (ownership; the result itself if same dtype)
  at::Tensor result;  // [V, D] in grad_out's dtype
};

template <typename scalar_t>
void backward_partition(const Inputs& in, size_t fi, const scalar_t* grad, bool mean, GradPlan& plan, int64_t p,
                        int64_t partitions, BadFeature& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const FeatureInfo& f = in.feats[fi];
  const void* ids = in.id_ptrs[fi];
  const bool is64 = in.id64[fi];
  const int64_t N = in.events;
  const int64_t row_floats = f.dim;

  // Adds event n's pooled gradient to the rows it read; `owns(id)` restricts writes to this partition.
  auto scatter_event = [&](int64_t n, acc_t* dst_table, auto owns) {
    const scalar_t* __restrict__ g = grad + n * in.total_dim + f.offset;
    acc_t w = 1;
    if (f.multi && mean) {
      int64_t count = 0;
      for (int64_t k = 0; k < f.k; ++k) count += load_id(ids, is64, n * f.k + k) >= 0;
      if (count == 0) return;
      w = acc_t(1) / static_cast<acc_t>(count);
    }
    for (int64_t k = 0; k < f.k; ++k) {
      const int64_t id = load_id(ids, is64, n * f.k + k);
      if (id < 0 || !owns(id)) continue;
      if (id >= f.rows) {
        bad.report(fi);
        continue;
      }
      acc_t* __restrict__ dst = dst_table + id * row_floats;
      for (int64_t d = 0; d < f.dim; ++d) dst[d] += w * static_cast<acc_t>(g[d]);
    }
  };

  if (plan.partials) {
    // This partition's own [V, D] table, summing a contiguous slice of the events.
    acc_t* mine = plan.acc.mutable_data_ptr<acc_t>() + p * f.rows * row_floats;
    std::fill(mine, mine + f.rows * row_floats, acc_t(0));
    for (int64_t n = N * p / partitions, hi = N * (p + 1) / partitions; n < hi; ++n)
      scatter_event(n, mine, [](int64_t) { return true; });
    return;
  }
  // Ownership: this partition's row blocks, from every event. Interleaved blocks balance tables whose
  // popular rows cluster (vocabularies sorted by frequency); a mask rather than a division for 2^k partitions.
  acc_t* acc = plan.acc.mutable_data_ptr<acc_t>();
  const int64_t blocks = (f.rows + kRowBlock - 1) / kRowBlock;
  for (int64_t b = p; b < blocks; b += partitions) {
    const int64_t r0 = b * kRowBlock, r1 = std::min(f.rows, r0 + kRowBlock);
    std::fill(acc + r0 * row_floats, acc + r1 * row_floats, acc_t(0));
  }
  if ((partitions & (partitions - 1)) == 0) {
    const int64_t mask = partitions - 1;
    for (int64_t n = 0; n < N; ++n)
      scatter_event(n, acc, [p, mask](int64_t id) { return ((id / kRowBlock) & mask) == p; });
  } else {
    for (int64_t n = 0; n < N; ++n)
      scatter_event(n, acc, [p, partitions](int64_t id) { return (id / kRowBlock) % partitions == p; });
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {  // convert the rows this partition owns
    scalar_t* out = plan.result.mutable_data_ptr<scalar_t>();
    for (int64_t b = p; b < blocks; b += partitions) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(f.rows, r0 + kRowBlock);
      for (int64_t i = r0 * row_floats; i < r1 * row_floats; ++i) out[i] = static_cast<scalar_t>(acc[i]);
    }
  }
}

std::vector<at::Tensor> embedding_concat_backward_cpu(const at::Tensor& grad_out, at::TensorList ids,
                                                      c10::IntArrayRef num_rows, c10::IntArrayRef dims,
                                                      std::string pooling) {
  Inputs in = prepare(ids, num_rows, dims, pooling);
  const bool mean = is_mean(pooling);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) * grad_out.size(1) == in.events &&
                        grad_out.size(2) == in.total_dim,
                    "embedding_concat_backward: grad_out must be [B, L, ", in.total_dim, "], got ",
                    grad_out.sizes());
  TORCH_CHECK(grad_out.device().is_cpu(), "embedding_concat_backward (CPU): grad_out is on ", grad_out.device());
  const at::Tensor grad = grad_out.contiguous();
  int64_t hits = 0;
  for (const auto& f : in.feats) hits += in.events * f.k;
  // Fewer partitions than threads when there is little work: each one must amortize its pass over the ids.
  const int64_t partitions = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), hits / 256));
  const bool is_double = grad.scalar_type() == at::kDouble;
  const auto acc_options = grad.options().dtype(is_double ? at::kDouble : at::kFloat);
  const bool same = is_double || grad.scalar_type() == at::kFloat;  // accumulate in the result itself
  std::vector<GradPlan> plans(in.feats.size());
  for (size_t fi = 0; fi < in.feats.size(); ++fi) {
    const FeatureInfo& f = in.feats[fi];
    GradPlan& plan = plans[fi];
    plan.partials = partitions > 1 && f.rows * f.dim * partitions <= (int64_t{1} << 18) && f.rows <= in.events * f.k;
    if (plan.partials) {
      plan.acc = at::empty({partitions, f.rows, f.dim}, acc_options);
    } else {
      plan.acc = at::empty({f.rows, f.dim}, acc_options);
      plan.result = same ? plan.acc : at::empty({f.rows, f.dim}, grad.options());
    }
  }
  BadFeature bad;
  // One parallel region for all features: every fork/join costs, and more so on a loaded machine.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_concat_backward_cpu",
                                  [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    at::parallel_for(0, partitions, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (size_t fi = 0; fi < in.feats.size(); ++fi)
          backward_partition<scalar_t>(in, fi, g, mean, plans[fi], p, partitions, bad);
    });
  });
  bad.raise_if_any(ids, num_rows);
  std::vector<at::Tensor> result;
  for (auto& plan : plans) {
    if (plan.partials) {  // small by construction: the sum and cast stay cheap
      at::Tensor sum = plan.acc.sum(0);
      plan.result = same ? sum : sum.to(grad.scalar_type());
    }
    result.push_back(plan.result);
  }
  return result;
}

}  // namespace

}  // namespace userllm

TORCH_LIBRARY_IMPL(userllm_native, CPU, m) {
  m.impl("embedding_concat", &userllm::embedding_concat_cpu);
  m.impl("embedding_concat_backward", &userllm::embedding_concat_backward_cpu);
}
