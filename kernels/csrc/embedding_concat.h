// Shared declarations of the userllm_native op library.
//
// Ops (namespace `userllm_native`, schemas in registration.cpp):
//   embedding_concat(Tensor[] ids, Tensor[] tables, str pooling) -> Tensor   (pooling: "mean" | "sum")
//       ids[f]: int32/int64 [B, L] or [B, L, K] (negative = padding); tables[f]: [V_f, D_f], one float dtype.
//       Returns [B, L, sum(D_f)] in the tables' dtype (see kernels/reference.py, the specification).
//   embedding_concat_backward(Tensor grad_out, Tensor[] ids, SymInt[] num_rows, SymInt[] dims, str pooling)
//       -> Tensor[]
//       grad_out: [B, L, sum(D_f)]; returns one dense gradient [num_rows[f], dims[f]] per table, in
//       grad_out's dtype (accumulated in float32).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace userllm {

// What a backend needs to know about one feature, after validation.
struct FeatureInfo {
  int64_t k;       // ids per event: 1 for [B, L] ids, K for [B, L, K]
  int64_t rows;    // V_f
  int64_t dim;     // D_f
  int64_t offset;  // first column of this feature in the concatenated output
  bool multi;      // ids were [B, L, K] (pooled) rather than [B, L]
};

// Checks everything but the id values (which each backend checks while reading them), with the same
// wording as kernels/reference.py's check_embedding_inputs. Returns per-feature layout and fills
// `events` (B * L) and `total_dim` (sum D_f).
std::vector<FeatureInfo> check_and_describe(
    at::TensorList ids, c10::IntArrayRef rows, c10::IntArrayRef dims, const std::string& pooling,
    int64_t* events, int64_t* total_dim);

// Error for an out-of-range id; `max_id` is the largest id of the feature (the reference's wording).
[[noreturn]] void throw_out_of_range(size_t feature, int64_t max_id, int64_t rows);

bool is_mean(const std::string& pooling);

}  // namespace userllm
