// CUDA binding of masked_topk: argument checks, contiguity, output and workspace allocation,
// device guard and stream; the kernels are the raw-pointer launchers of masked_topk.cu.
// Named <op>_binding.cpp rather than <op>.cpp: setuptools names object files by stem, and
// <op>.cpp would collide with <op>.cu in the build directory.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../utils.h"
#include "binding_utils.h"

namespace {

std::tuple<at::Tensor, at::Tensor> masked_topk_cuda(const at::Tensor& queries_,
                                                    const at::Tensor& bank_, int64_t k,
                                                    const c10::optional<at::Tensor>& exclude_mask_,
                                                    const c10::optional<at::Tensor>& exclude_index_) {
  acn::check_masked_topk_args(queries_, bank_, k, exclude_mask_, exclude_index_);
  TORCH_CHECK(queries_.is_cuda(), "queries must be a CUDA tensor for the cuda backend, got ",
              queries_.device());
  const auto dt = acn::cuda::dtype_tag(queries_.scalar_type(), "queries");
  const c10::cuda::CUDAGuard guard(queries_.device());
  const auto queries = queries_.contiguous(), bank = bank_.contiguous();
  const at::Tensor mask = exclude_mask_.has_value() ? exclude_mask_->contiguous() : at::Tensor();
  const at::Tensor excl = exclude_index_.has_value() ? exclude_index_->contiguous() : at::Tensor();
  const int64_t B = queries.size(0), N = bank.size(0), D = queries.size(1);
  const auto acc = acn::acc_dtype(queries.scalar_type());
  at::Tensor dists = acn::new_output({B, k}, queries.options().dtype(acc));
  at::Tensor indices = acn::new_output({B, k}, queries.options().dtype(at::kLong));
  if (B == 0) return {dists, indices};

  acn::cuda::TopkPlan plan;
  const cudaError_t plan_err = acn::cuda::masked_topk_plan(dt, B, N, D, static_cast<int>(k), &plan);
  TORCH_CHECK(plan_err == cudaSuccess, "masked_topk (cuda): no launch configuration for B=", B,
              ", N=", N, ", D=", D, ", k=", k, ": ", cudaGetErrorString(plan_err));
  // Row statistics, compacted rows, per-split lists and the merge tree's levels (bounded by the
  // plan; never B x N). The caching allocator's blocks are 512-byte aligned.
  at::Tensor workspace;
  if (plan.workspace_bytes > 0)
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, queries.options().dtype(at::kByte));
  C10_CUDA_CHECK(acn::cuda::masked_topk(
      plan, queries.const_data_ptr(), bank.const_data_ptr(),
      mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
      excl.defined() ? excl.const_data_ptr<int64_t>() : nullptr, dists.data_ptr(),
      indices.data_ptr<int64_t>(), workspace.defined() ? workspace.data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream()));
  return {dists, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(acn_kernels, CUDA, m) { m.impl("masked_topk", &masked_topk_cuda); }
