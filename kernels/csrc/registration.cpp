// Op schemas of the userllm_native library and the input checks shared by its CPU and CUDA kernels.
//
// The library is a plain shared object loaded with torch.ops.load_library (no Python module, no
// pybind): TORCH_LIBRARY defines the schemas here, TORCH_LIBRARY_IMPL in each backend's source
// registers kernels, and kernels/native.py adds autograd and fake (meta) implementations.
#include <torch/library.h>

#include "embedding_concat.h"

namespace userllm {

bool is_mean(const std::string& pooling) {
  TORCH_CHECK_VALUE(pooling == "mean" || pooling == "sum",
                    "embedding_concat: pooling must be one of ('mean', 'sum'), got '", pooling, "'");
  return pooling == "mean";
}

void throw_out_of_range(size_t feature, int64_t max_id, int64_t rows) {
  TORCH_CHECK_INDEX(false, "embedding_concat: feature ", feature, " has id ", max_id,
                    " but its table has only ", rows, " rows");
  __builtin_unreachable();
}

std::vector<FeatureInfo> check_and_describe(
    at::TensorList ids, c10::IntArrayRef rows, c10::IntArrayRef dims, const std::string& pooling,
    int64_t* events, int64_t* total_dim) {
  is_mean(pooling);
  TORCH_CHECK_VALUE(ids.size() == rows.size() && ids.size() == dims.size(), "embedding_concat: got ",
                    ids.size(), " id tensors but ", rows.size(), " tables");
  TORCH_CHECK_VALUE(!ids.empty(), "embedding_concat: needs at least one feature");
  const auto lead = ids[0].sizes().slice(0, std::min<size_t>(2, ids[0].dim()));
  std::vector<FeatureInfo> out;
  int64_t offset = 0;
  for (size_t f = 0; f < ids.size(); ++f) {
    const at::Tensor& x = ids[f];
    TORCH_CHECK_TYPE(x.scalar_type() == at::kInt || x.scalar_type() == at::kLong, "embedding_concat: ids[",
                     f, "] must be int32 or int64, got ", x.scalar_type());
    TORCH_CHECK_VALUE((x.dim() == 2 || x.dim() == 3) && lead.size() == 2 && x.sizes().slice(0, 2) == lead,
                      "embedding_concat: ids[", f, "] must be [B, L] or [B, L, K] with [B, L] = ", lead,
                      ", got ", x.sizes());
    TORCH_CHECK_VALUE(x.device() == ids[0].device(), "embedding_concat: ids[", f, "] is on ", x.device(),
                      " but ids[0] is on ", ids[0].device());
    const int64_t k = x.dim() == 3 ? x.size(2) : 1;
    out.push_back(FeatureInfo{k, rows[f], dims[f], offset, x.dim() == 3});
    offset += dims[f];
  }
  *events = lead[0] * lead[1];
  *total_dim = offset;
  return out;
}

}  // namespace userllm

TORCH_LIBRARY(userllm_native, m) {
  // No default for `pooling`: the dispatcher drops arguments equal to their default, which would change the
  // argument structure register_autograd's backward must mirror.
  m.def("embedding_concat(Tensor[] ids, Tensor[] tables, str pooling) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("embedding_concat_backward(Tensor grad_out, Tensor[] ids, SymInt[] num_rows, SymInt[] dims, "
        "str pooling) -> Tensor[]",
        {at::Tag::pt2_compliant_tag});
}
