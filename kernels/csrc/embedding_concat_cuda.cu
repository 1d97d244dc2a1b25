// CUDA kernels of embedding_concat (compiled only when torch has CUDA and a CUDA compiler is found).
//
// Forward: a row of threads per event (several events per block) covering the concatenated row's columns;
// the features of a launch are passed by value in the kernel parameters (up to kMaxFeatures per launch,
// more features take more launches), so every launch writes straight into its columns of the output.
// Backward: per feature, the (id, entry) pairs are sorted by id (padding sorts last); each thread row of a
// block sums a chunk of consecutive sorted entries in registers and issues one atomicAdd into a float32
// [V, D] buffer (float64 for float64 tables) per run of equal ids and column. A 10-row table hit by every
// event thus costs about nnz / kChunk atomics per row and column instead of nnz, and a large table's rows
// receive one atomic per chunk that touches them.
//
// 16-byte accesses: each thread moves a Pack of kVec<scalar_t> = 16 / sizeof(scalar_t) consecutive
// columns (4 fp32, 8 bf16/fp16, 2 fp64), so table rows are read and output rows written with one 128-bit
// instruction per thread (LDG.E.128 / STG.E.128) instead of 4-8 scalar ones, as the Triton kernel does.
// That needs every feature's width and output column, the output row width and every base pointer to be
// multiples of 16 bytes (issue 15's layout 64 + 8 + 32 = 104 columns is, in fp32 and bf16); a launch
// where any of them is not takes the same kernel with Pack width 1 (scalar accesses). The backward reads
// grad_out the same way, and on sm_90 adds 4 floats per vector atomic (RED.E.ADD.F32x4).
// kernels/cuda_check.py compiles this file for sm_80/sm_90 without a GPU and asserts the 128-bit
// accesses in the SASS of the vectorised instantiations.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "embedding_concat.h"

namespace userllm {
namespace {

constexpr int kMaxFeatures = 16;
constexpr int kThreads = 256;
constexpr int64_t kChunk = 64;  // sorted entries per thread row in the backward
constexpr int kAccessBytes = 16;  // widest global load/store per thread (LDG.E.128 / STG.E.128)

// kVec<T> consecutive elements moved by one 16-byte instruction; alignas makes the compiler emit it.
template <typename T>
constexpr int kVec = kAccessBytes / static_cast<int>(sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Threads along a row: enough for the row's packs, a power of two, at most a warp (so the rest of the
// block's kThreads take more rows): issue 15's 104 bf16 columns are 13 packs -> 16 threads, not 32 with
// 19 idle.
inline int threads_along(int64_t packs, int cap) {
  int bx = 1;
  while (bx < packs && bx < cap) bx *= 2;
  return bx;
}

// Writes a pack with one store of its full width. A plain `*reinterpret_cast<Pack*>(dst) = pack` (or a
// store of a uint4 memcpy'd from it) comes out of nvcc 13 as one store per 4 bytes or less (STG.E x4 for
// fp32, st.global.v2.u16 x4 for bf16, read in the PTX and SASS); __stwb, the plain write-back store
// written as inline PTX, keeps the vector: st.global.wb.v4.u32 -> STG.E.128.
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, N>& pack) {
  if constexpr (sizeof(pack) == 16) {
    uint32_t w[4];
    memcpy(w, &pack, sizeof(w));
    asm("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
        : "memory");
  } else {
    *reinterpret_cast<Pack<T, N>*>(dst) = pack;
  }
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % kAccessBytes == 0; }

struct FeatureParams {
  const void* ids;
  const void* table;
  int64_t k, rows, dim;
  int64_t out_col;    // first output column of this feature
  int64_t group_col;  // first column of this feature within the launch's group
  int is64;
};

struct ForwardParams {
  FeatureParams f[kMaxFeatures];
  int num;
  int mean;
  int64_t events, total_dim, group_cols;
  int* bad;  // lowest feature index with an out-of-range id (INT_MAX when none)
};

__device__ __forceinline__ int64_t load_id(const FeatureParams& f, int64_t i) {
  return f.is64 ? static_cast<const int64_t*>(f.ids)[i] : static_cast<const int32_t*>(f.ids)[i];
}

// Block (bx, kThreads / bx): threadIdx.y picks an event of the block's tile, threadIdx.x strides over the
// launch's columns VEC at a time, so a row of threads reads table rows and writes the output row along
// consecutive 16-byte packs; no integer division. VEC > 1 only when the launcher checked that every
// feature's width and column, the row width and the pointers are multiples of VEC elements / 16 bytes.
template <typename scalar_t, int VEC>
__global__ void forward_kernel(const ForwardParams p, scalar_t* __restrict__ out, int first_feature) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; n < p.events;
       n += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    int fi = 0;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < p.group_cols;
         c += static_cast<int64_t>(blockDim.x) * VEC) {
      while (fi + 1 < p.num && c >= p.f[fi + 1].group_col) ++fi;  // columns only increase
      const FeatureParams& f = p.f[fi];
      const int64_t d = c - f.group_col;
      const scalar_t* __restrict__ table = static_cast<const scalar_t*>(f.table);
      acc_t acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = 0;
      int count = 0;
      for (int64_t k = 0; k < f.k; ++k) {
        const int64_t id = load_id(f, n * f.k + k);
        if (id < 0) continue;
        if (id >= f.rows) {
          if (d == 0) atomicMin(p.bad, first_feature + fi);
          continue;
        }
        const pack_t row = *reinterpret_cast<const pack_t*>(table + id * f.dim + d);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += static_cast<acc_t>(row.v[j]);
        ++count;
      }
      pack_t o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (p.mean && count > 0) acc[j] /= static_cast<acc_t>(count);
        o.v[j] = static_cast<scalar_t>(acc[j]);
      }
      store_pack(out + n * p.total_dim + f.out_col + d, o);
    }
  }
}

// Adds a run's VEC column sums to acc[0 .. VEC): 16-byte vector atomics on sm_90 for float (4 floats per
// RED), one scalar atomic per column elsewhere (sm_80 has no vector float atomics; fp64 has none at all).
template <typename acc_t, int VEC>
__device__ __forceinline__ void add_run(acc_t* __restrict__ acc, const acc_t (&sum)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool vector_red = std::is_same_v<acc_t, float> && VEC % 4 == 0;
#else
  constexpr bool vector_red = false;
#endif
  if constexpr (vector_red) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4)
      atomicAdd(reinterpret_cast<float4*>(acc + j), make_float4(sum[j], sum[j + 1], sum[j + 2], sum[j + 3]));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(acc + j, sum[j]);
  }
}

// VEC > 1 only when dim, offset, total_dim and the grad pointer allow 16-byte packs (the launcher checks);
// the [V, D] accumulator is a fresh allocation, so acc + id * dim + d is then 16-byte aligned as well.
template <typename scalar_t, int VEC, typename acc_t = at::opmath_type<scalar_t>>
__global__ void backward_kernel(
    const int64_t* __restrict__ sorted_ids, const int64_t* __restrict__ entries, int64_t nnz, int64_t k,
    const scalar_t* __restrict__ grad, int64_t total_dim, int64_t offset, int64_t dim, int64_t rows,
    const acc_t* __restrict__ weight, acc_t* __restrict__ acc) {
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t start = (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * kChunk;
  if (start >= nnz) return;
  const int64_t end = min(start + kChunk, nnz);
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < dim; d += static_cast<int64_t>(blockDim.x) * VEC) {
    int64_t prev = -1;
    acc_t sum[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum[j] = 0;
    for (int64_t i = start; i < end; ++i) {
      const int64_t id = sorted_ids[i];
      if (id >= rows) break;  // padding (mapped to `rows`) sorts last
      if (id != prev) {
        if (prev >= 0) add_run<acc_t, VEC>(acc + prev * dim + d, sum);
        prev = id;
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[j] = 0;
      }
      const int64_t n = entries[i] / k;
      const pack_t g = *reinterpret_cast<const pack_t*>(grad + n * total_dim + offset + d);
      const acc_t w = weight ? weight[n] : acc_t(1);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[j] += weight ? static_cast<acc_t>(g.v[j]) * w : static_cast<acc_t>(g.v[j]);
    }
    if (prev >= 0) add_run<acc_t, VEC>(acc + prev * dim + d, sum);
  }
}

at::Tensor embedding_concat_cuda(at::TensorList ids, at::TensorList tables, std::string pooling) {
  TORCH_CHECK_VALUE(ids.size() == tables.size(), "embedding_concat: got ", ids.size(), " id tensors but ",
                    tables.size(), " tables");
  std::vector<int64_t> rows, dims;
  for (size_t f = 0; f < tables.size(); ++f) {
    const at::Tensor& t = tables[f];
    TORCH_CHECK_VALUE(t.dim() == 2, "embedding_concat: tables[", f, "] must be [V, D], got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == tables[0].scalar_type(), "embedding_concat: tables[", f, "] is ",
                     t.scalar_type(), " but tables[0] is ", tables[0].scalar_type());
    TORCH_CHECK(t.device() == tables[0].device() && ids[f].device() == t.device(), "embedding_concat (CUDA): "
                "feature ", f, " has ids on ", ids[f].device(), " and table on ", t.device(), ", tables[0] is on ",
                tables[0].device());
    rows.push_back(t.size(0));
    dims.push_back(t.size(1));
  }
  int64_t events = 0, total_dim = 0;
  const auto feats = check_and_describe(ids, rows, dims, pooling, &events, &total_dim);
  const bool mean = is_mean(pooling);
  const c10::cuda::CUDAGuard guard(tables[0].device());
  std::vector<at::Tensor> ids_c, tabs_c;
  for (size_t f = 0; f < ids.size(); ++f) {
    ids_c.push_back(ids[f].contiguous());
    tabs_c.push_back(tables[f].contiguous());
  }
  at::Tensor out = at::empty({ids[0].size(0), ids[0].size(1), total_dim}, tables[0].options());
  at::Tensor bad = at::full({1}, INT_MAX, tables[0].options().dtype(at::kInt));
  if (events == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "embedding_concat_cuda", [&] {
    for (size_t g0 = 0; g0 < feats.size(); g0 += kMaxFeatures) {
      ForwardParams p{};
      p.num = static_cast<int>(std::min<size_t>(kMaxFeatures, feats.size() - g0));
      p.mean = mean;
      p.events = events;
      p.total_dim = total_dim;
      p.bad = bad.mutable_data_ptr<int>();
      int64_t cols = 0;
      for (int j = 0; j < p.num; ++j) {
        const auto& fi = feats[g0 + j];
        p.f[j] = FeatureParams{ids_c[g0 + j].const_data_ptr(), tabs_c[g0 + j].const_data_ptr(), fi.k, fi.rows,
                               fi.dim, fi.offset, cols, ids_c[g0 + j].scalar_type() == at::kLong};
        cols += fi.dim;
      }
      p.group_cols = cols;
      if (cols == 0) continue;
      // 16-byte packs when every width, column, the row width and every pointer allow them (see the top)
      constexpr int vec = kVec<scalar_t>;
      bool packed = total_dim % vec == 0 && aligned16(out.const_data_ptr());
      for (int j = 0; j < p.num; ++j)
        packed = packed && p.f[j].dim % vec == 0 && p.f[j].out_col % vec == 0 && aligned16(p.f[j].table);
      const int bx = threads_along((cols + (packed ? vec : 1) - 1) / (packed ? vec : 1), 32);
      const dim3 block(bx, kThreads / bx);
      const int64_t blocks = std::min<int64_t>((events + block.y - 1) / block.y, int64_t{1} << 20);
      if (packed)
        forward_kernel<scalar_t, vec><<<blocks, block, 0, stream>>>(p, out.mutable_data_ptr<scalar_t>(),
                                                                    static_cast<int>(g0));
      else
        forward_kernel<scalar_t, 1><<<blocks, block, 0, stream>>>(p, out.mutable_data_ptr<scalar_t>(),
                                                                  static_cast<int>(g0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // One 4-byte read back (a sync) so that a bad id raises a Python error rather than a device-side assert.
  const int first_bad = bad.item<int>();
  if (first_bad != INT_MAX) throw_out_of_range(first_bad, ids[first_bad].max().item<int64_t>(), rows[first_bad]);
  return out;
}

std::vector<at::Tensor> embedding_concat_backward_cuda(const at::Tensor& grad_out, at::TensorList ids,
                                                       c10::IntArrayRef num_rows, c10::IntArrayRef dims,
                                                       std::string pooling) {
  int64_t events = 0, total_dim = 0;
  const auto feats = check_and_describe(ids, num_rows, dims, pooling, &events, &total_dim);
  const bool mean = is_mean(pooling);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) * grad_out.size(1) == events &&
                        grad_out.size(2) == total_dim,
                    "embedding_concat_backward: grad_out must be [B, L, ", total_dim, "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.is_cuda() && ids[0].device() == grad_out.device(),
              "embedding_concat_backward (CUDA): grad_out is on ", grad_out.device(), ", ids on ", ids[0].device());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor grad = grad_out.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> result;
  for (size_t fi = 0; fi < feats.size(); ++fi) {
    const FeatureInfo& f = feats[fi];
    const at::Tensor x = ids[fi].reshape({events, f.k}).to(at::kLong);
    const auto acc_dtype = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor acc = at::zeros({f.rows, f.dim}, grad.options().dtype(acc_dtype));
    const int64_t nnz = events * f.k;
    if (nnz > 0 && f.dim > 0 && f.rows > 0) {
      // Padding becomes `rows` so that it sorts after every real id and the kernel stops there.
      const at::Tensor keys = x.masked_fill(x.lt(0), f.rows).reshape({nnz});
      const auto [sorted, entries] = keys.sort();
      at::Tensor weight;
      if (f.multi && mean) weight = x.ge(0).sum(1).clamp_min(1).to(acc_dtype).reciprocal();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_concat_backward_cuda",
                                      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int vec = kVec<scalar_t>;
        const bool packed = f.dim % vec == 0 && f.offset % vec == 0 && total_dim % vec == 0 &&
                            aligned16(grad.const_data_ptr()) && aligned16(acc.const_data_ptr());
        const int bx = threads_along((f.dim + (packed ? vec : 1) - 1) / (packed ? vec : 1), 64);
        const dim3 block(bx, kThreads / bx);
        const int64_t blocks = (nnz + kChunk * block.y - 1) / (kChunk * block.y);
        auto launch = [&](auto kernel) {
          kernel<<<blocks, block, 0, stream>>>(
              sorted.const_data_ptr<int64_t>(), entries.const_data_ptr<int64_t>(), nnz, f.k,
              grad.const_data_ptr<scalar_t>(), total_dim, f.offset, f.dim, f.rows,
              weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr, acc.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (packed)
          launch(backward_kernel<scalar_t, vec>);
        else
          launch(backward_kernel<scalar_t, 1>);
      });
    }
    result.push_back(acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type()));
  }
  return result;
}

}  // namespace
}  // namespace userllm

TORCH_LIBRARY_IMPL(userllm_native, CUDA, m) {
  m.impl("embedding_concat", &userllm::embedding_concat_cuda);
  m.impl("embedding_concat_backward", &userllm::embedding_concat_backward_cuda);
}
