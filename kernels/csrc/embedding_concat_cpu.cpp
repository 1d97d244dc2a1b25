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
#include <utility>

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

// ----------------------------------------------------------------------------------------------- forward
//
// What this does that the peer a PyTorch user writes (F.embedding_bag(ids.clamp_min(0), table, mode="sum",
// per_sample_weights=valid / count) per feature, then torch.cat) does not:
//   * One pass over the output: every event's concatenated row [sum D_f] is written once, in place, by
//     one thread. The peer writes each feature's [E, D_f] result, then cat reads them all again and
//     writes [E, sum D_f] a second time (for the benchmark shape 5.3 MB of extra reads + writes, ~1 ms
//     at the ~10 GB/s one core gets), and it builds the clamp, the valid mask and the weights
//     [E, K] as three more tensors per feature before the lookup starts.
//   * Padding and mean pooling inside the gather: a padding id is skipped (no row read, no multiply by
//     a zero weight), the first valid row is copied rather than added to a zeroed accumulator, and the
//     mean is one multiply per output element by 1 / count.
//   * Events in blocks of kBlockEvents whose output rows stay in L1/L2 while every feature fills its
//     column slice, with the id type and the feature's layout resolved once per block, so the inner
//     loops are plain contiguous copies and adds (AVX2 where the CPU has it, see forward_range).
//   * Software prefetch of the table rows kPrefetchAhead events ahead for tables larger than L2 (the
//     100k x 64 item table: 25.6 MB, every lookup a likely cache miss), so the misses of successive
//     events overlap instead of each stalling the copy.
// Tried on issue 15's shape, 1 thread, 2026-12-01 (benchmarks/cpu_forward_bounds.py, CPU time, 3 interleaved
// processes of 30 rounds per variant, load average 7-10): prefetch 4 / 16 / 32 events ahead, the L2 hint
// (prefetcht1) instead of L1, blocks of 1 / 4 / 8 / 256 events, and prefetching a whole block's item rows up
// front with the small features processed first (so that the misses overlap the pooled adds). Blocks of 1
// were 1.7x slower (the per-feature dispatch per event); all the others stayed within the runs' noise
// (native 2.3-2.9 ms, 1.55-1.88x the embedding_bag peer), so the simplest setting stays.
constexpr int64_t kBlockEvents = 64;    // 64 x 104 floats of output = 26 KB: stays in L1/L2 across features
constexpr int64_t kPrefetchAhead = 8;   // events ahead: ~8 outstanding row misses of 256 B each
constexpr int64_t kL2TableBytes = 512 * 1024;  // tables below this are cache-resident: no prefetch

template <typename scalar_t>
struct FwdFeature {
  const scalar_t* table;
  const void* ids;
  bool id64, multi, prefetch;
  int64_t k, rows, dim, offset;
};

template <typename scalar_t>
__attribute__((always_inline)) inline void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(p + b, 0, 3);
}

// Events [n0, n1) of one feature into their column slice of the output rows (out points at event 0's row).
// kDim > 0: the feature's width as a compile-time constant (the common widths, see forward_range_impl),
// so the pooled adds compile to straight-line vector code without remainder loops.
template <typename scalar_t, typename id_t, int64_t kDim>
__attribute__((always_inline)) inline void forward_feature_block(const FwdFeature<scalar_t>& f, int64_t fi,
                                                                 int64_t n0, int64_t n1, int64_t events,
                                                                 scalar_t* out, int64_t total_dim, bool mean,
                                                                 at::opmath_type<scalar_t>* scratch,
                                                                 BadFeature& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const id_t* __restrict__ ids = static_cast<const id_t*>(f.ids);
  const scalar_t* __restrict__ table = f.table;
  const int64_t dim = kDim > 0 ? kDim : f.dim, rows = f.rows, K = f.k;
  const int64_t ahead = std::min(n1 + kPrefetchAhead, events);
  if (!f.multi) {
    for (int64_t n = n0; n < n1; ++n) {
      if (f.prefetch && n + kPrefetchAhead < ahead) {
        const int64_t next = ids[n + kPrefetchAhead];
        if (next >= 0 && next < rows) prefetch_row(table + next * dim, dim);
      }
      scalar_t* __restrict__ o = out + n * total_dim + f.offset;
      const int64_t id = ids[n];
      if (id >= 0 && id < rows) {
        std::memcpy(o, table + id * dim, dim * sizeof(scalar_t));
      } else {
        if (id >= rows) bad.report(fi);
        std::memset(o, 0, dim * sizeof(scalar_t));  // zero bits are 0.0 in every float format
      }
    }
    return;
  }
  // fp32/fp64 accumulate straight into the output row; half types in an fp32 scratch row
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  for (int64_t n = n0; n < n1; ++n) {
    if (f.prefetch && n + kPrefetchAhead < ahead) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t next = ids[(n + kPrefetchAhead) * K + k];
        if (next >= 0 && next < rows) prefetch_row(table + next * dim, dim);
      }
    }
    scalar_t* __restrict__ o = out + n * total_dim + f.offset;
    acc_t* __restrict__ a = direct ? reinterpret_cast<acc_t*>(o) : scratch;
    int64_t count = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t id = ids[n * K + k];
      if (id < 0) continue;
      if (id >= rows) {
        bad.report(fi);
        continue;
      }
      const scalar_t* __restrict__ src = table + id * dim;
      if (count == 0) {
        for (int64_t d = 0; d < dim; ++d) a[d] = static_cast<acc_t>(src[d]);
      } else {
        for (int64_t d = 0; d < dim; ++d) a[d] += static_cast<acc_t>(src[d]);
      }
      ++count;
    }
    if (count == 0) {
      std::memset(o, 0, dim * sizeof(scalar_t));
    } else if (mean && count > 1) {
      const acc_t scale = acc_t(1) / static_cast<acc_t>(count);
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(a[d] * scale);
    } else if (!direct) {
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(a[d]);
    }
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline void forward_range_impl(const std::vector<FwdFeature<scalar_t>>& feats,
                                                              int64_t begin, int64_t end, int64_t events,
                                                              scalar_t* out, int64_t total_dim, bool mean,
                                                              at::opmath_type<scalar_t>* scratch,
                                                              BadFeature& bad) {
  for (int64_t n0 = begin; n0 < end; n0 += kBlockEvents) {
    const int64_t n1 = std::min(end, n0 + kBlockEvents);
    for (size_t fi = 0; fi < feats.size(); ++fi) {
      const FwdFeature<scalar_t>& f = feats[fi];
      auto run = [&](auto id_tag, auto dim_tag) {
        forward_feature_block<scalar_t, decltype(id_tag), decltype(dim_tag)::value>(f, fi, n0, n1, events, out,
                                                                                   total_dim, mean, scratch, bad);
      };
      auto with_dim = [&](auto id_tag) {
        // single-valued features are one memcpy per event: the width need not be constant there
        switch (f.multi ? f.dim : 0) {
          case 8: return run(id_tag, std::integral_constant<int64_t, 8>{});
          case 16: return run(id_tag, std::integral_constant<int64_t, 16>{});
          case 32: return run(id_tag, std::integral_constant<int64_t, 32>{});
          case 64: return run(id_tag, std::integral_constant<int64_t, 64>{});
          default: return run(id_tag, std::integral_constant<int64_t, 0>{});
        }
      };
      if (f.id64)
        with_dim(int64_t{});
      else
        with_dim(int32_t{});
    }
  }
}

// Two compilations of the same body: one for AVX2 + FMA (chosen at run time when the CPU has them), one
// for the baseline x86-64 the library is built for, so the .so still loads on any x86-64 CPU. The
// baseline has only SSE2: the 32-wide fp32 adds of the genre feature take 8 instructions instead of 4.
#if defined(__x86_64__) && defined(__GNUC__)
#define USERLLM_HAVE_AVX2_CLONE 1
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_range_avx2(const std::vector<FwdFeature<scalar_t>>& feats,
                                                            int64_t begin, int64_t end, int64_t events,
                                                            scalar_t* out, int64_t total_dim, bool mean,
                                                            at::opmath_type<scalar_t>* scratch, BadFeature& bad) {
  forward_range_impl<scalar_t>(feats, begin, end, events, out, total_dim, mean, scratch, bad);
}
#endif

template <typename scalar_t>
void forward_range_default(const std::vector<FwdFeature<scalar_t>>& feats, int64_t begin, int64_t end,
                           int64_t events, scalar_t* out, int64_t total_dim, bool mean,
                           at::opmath_type<scalar_t>* scratch, BadFeature& bad) {
  forward_range_impl<scalar_t>(feats, begin, end, events, out, total_dim, mean, scratch, bad);
}

bool cpu_has_avx2() {
#ifdef USERLLM_HAVE_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

template <typename scalar_t>
void forward_kernel(const Inputs& in, const std::vector<const scalar_t*>& tables, scalar_t* out, bool mean,
                    BadFeature& bad) {
  std::vector<FwdFeature<scalar_t>> feats;
  int64_t work = 0, max_dim = 0;
  for (size_t fi = 0; fi < in.feats.size(); ++fi) {
    const FeatureInfo& f = in.feats[fi];
    const bool big = f.rows * f.dim * static_cast<int64_t>(sizeof(scalar_t)) > kL2TableBytes;
    feats.push_back(FwdFeature<scalar_t>{tables[fi], in.id_ptrs[fi], in.id64[fi], f.multi, big, f.k, f.rows,
                                         f.dim, f.offset});
    work += f.k * f.dim;
    max_dim = std::max(max_dim, f.dim);
  }
  // >= ~32k elements of work per task (fork/join costs more than a few hundred events of lookups), in
  // whole blocks
  const int64_t grain = std::max<int64_t>(kBlockEvents, 32768 / std::max<int64_t>(1, work));
  const bool avx2 = cpu_has_avx2();
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, in.events, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(max_dim);
#ifdef USERLLM_HAVE_AVX2_CLONE
    if (avx2) {
      forward_range_avx2<scalar_t>(feats, begin, end, in.events, out, in.total_dim, mean, scratch.data(), bad);
      return;
    }
#endif
    forward_range_default<scalar_t>(feats, begin, end, in.events, out, in.total_dim, mean, scratch.data(), bad);
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
