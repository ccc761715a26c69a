// Helpers shared by the CPU and CUDA bindings (torch side only; never included by .cu files).
#pragma once

#include <torch/extension.h>

#include <limits>

namespace acn {

// Test hook: when set (acn_kernels._C.set_poison_outputs), kernels allocate their outputs filled
// with NaN (floats) or INT64_MIN (indices) instead of uninitialised memory, so a test fails on any
// output element a kernel forgot to write.
bool& poison_outputs_flag();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!poison_outputs_flag()) return at::empty(sizes, opts);
  if (at::isFloatingType(opts.dtype().toScalarType()))
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), opts);
  return at::full(sizes, std::numeric_limits<int64_t>::min(), opts);
}

// Accumulation dtype: float for float32/float16/bfloat16, double for float64.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Argument checks shared by every backend's binding; messages name the argument.
void check_mixture_args(const at::Tensor& z, const at::Tensor& logits, const at::Tensor& means,
                        const at::Tensor& log_scales, const c10::optional<at::Tensor>& code,
                        const c10::optional<at::Tensor>& posterior_log_scale);

void check_masked_topk_args(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                     const c10::optional<at::Tensor>& exclude_mask,
                     const c10::optional<at::Tensor>& exclude_index);

// candidates [B, C] int64, index [B] int64, uniforms [B] float32/float64, 1 <= k <= kMaxK,
// fallback [B, F] int64 or none; one device.
void check_resolve_neighbours_args(const at::Tensor& candidates, const at::Tensor& index,
                                   const at::Tensor& uniforms, int64_t k,
                                   const c10::optional<at::Tensor>& fallback);

// The largest k any backend accepts (acn_kernels.MAX_K).
constexpr int64_t kMaxK = 1024;

}  // namespace acn
