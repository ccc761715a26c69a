// Helpers shared by the CUDA bindings (<op>_binding.cpp; torch side, never included by .cu files).
#pragma once

#include <torch/extension.h>

#include "launchers.h"

namespace acn {
namespace cuda {

// The launchers' dtype tag of a tensor's dtype; `name` is the argument named in the error.
inline DType dtype_tag(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, name, " must be float32, float16, bfloat16 or float64 for the cuda backend, got ", t);
  }
}

}  // namespace cuda
}  // namespace acn
