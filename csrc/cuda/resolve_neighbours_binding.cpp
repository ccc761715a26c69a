// CUDA binding of resolve_neighbours: argument checks, contiguity, output and workspace
// allocation, device guard and stream; the kernel is the raw-pointer launcher of
// resolve_neighbours.cu. Named <op>_binding.cpp: setuptools names object files by stem, and
// <op>.cpp would collide with <op>.cu in the build directory.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../utils.h"
#include "binding_utils.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> resolve_neighbours_cuda(
    const at::Tensor& candidates_, const at::Tensor& index_, const at::Tensor& uniforms_,
    int64_t k, const c10::optional<at::Tensor>& fallback_) {
  acn::check_resolve_neighbours_args(candidates_, index_, uniforms_, k, fallback_);
  TORCH_CHECK(candidates_.is_cuda(), "candidates must be a CUDA tensor for the cuda backend, got ",
              candidates_.device());
  const c10::cuda::CUDAGuard guard(candidates_.device());
  const auto cand = candidates_.contiguous(), index = index_.contiguous(),
             uniforms = uniforms_.contiguous();
  const at::Tensor fb = fallback_.has_value() ? fallback_->contiguous() : at::Tensor();
  const int64_t B = cand.size(0), C = cand.size(1), F = fb.defined() ? fb.size(1) : 0;
  const auto opts = cand.options();
  at::Tensor picks = acn::new_output({B}, opts), taken = acn::new_output({B}, opts),
             status = acn::new_output({B}, opts);
  if (B == 0) return {picks, taken, status};
  const int64_t ws_entries = acn::cuda::resolve_neighbours_workspace(B);
  const at::Tensor ws = ws_entries > 0 ? at::empty({ws_entries}, opts) : at::Tensor();
  C10_CUDA_CHECK(acn::cuda::resolve_neighbours(
      B, C, F, k, cand.const_data_ptr<int64_t>(), index.const_data_ptr<int64_t>(),
      uniforms.const_data_ptr(), uniforms.scalar_type() == at::kDouble,
      fb.defined() ? fb.const_data_ptr<int64_t>() : nullptr, picks.data_ptr<int64_t>(),
      taken.data_ptr<int64_t>(), status.data_ptr<int64_t>(),
      ws.defined() ? ws.data_ptr<int64_t>() : nullptr, c10::cuda::getCurrentCUDAStream()));
  return {picks, taken, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(acn_kernels, CUDA, m) { m.impl("resolve_neighbours", &resolve_neighbours_cuda); }
