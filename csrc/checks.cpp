// The C++ ops' argument checks, shared by the CPU and CUDA bindings. They repeat, in the same
// words, the structural checks of acn_kernels/checks.py (the one contract check of the public
// functions), because the registered ops are callable directly (torch.ops.acn_kernels.*) and
// must never read out of bounds, whatever they are given.
#include "utils.h"

namespace acn {

static void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

void check_mixture_args(const at::Tensor& z, const at::Tensor& logits, const at::Tensor& means,
                        const at::Tensor& log_scales, const c10::optional<at::Tensor>& code,
                        const c10::optional<at::Tensor>& posterior_log_scale) {
  TORCH_CHECK(z.dim() == 2, "z must have shape [B, D], got ", z.sizes());
  check_float(z, "z");
  const std::pair<const at::Tensor*, const char*> params[] = {
      {&logits, "logits"}, {&means, "means"}, {&log_scales, "log_scales"}};
  for (const auto& [t, name] : params) {
    TORCH_CHECK(t->dim() == 3, name, " must have shape [B, D, M], got ", t->sizes());
    TORCH_CHECK(t->size(0) == z.size(0) && t->size(1) == z.size(1), name, " has shape ",
                t->sizes(), " but z has shape ", z.sizes());
    TORCH_CHECK(t->size(2) == logits.size(2), name, " has ", t->size(2),
                " components but logits has ", logits.size(2));
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), name, " has dtype ", t->scalar_type(),
                " but z has dtype ", z.scalar_type());
    TORCH_CHECK(t->device() == z.device(), name, " is on ", t->device(), " but z is on ",
                z.device());
  }
  TORCH_CHECK(logits.size(2) >= 1, "logits must have at least one component (M >= 1)");
  if (code.has_value()) {
    TORCH_CHECK(code->sizes() == z.sizes(), "code has shape ", code->sizes(),
                " but z has shape ", z.sizes());
    TORCH_CHECK(code->scalar_type() == z.scalar_type(), "code has dtype ", code->scalar_type(),
                " but z has dtype ", z.scalar_type());
    TORCH_CHECK(code->device() == z.device(), "code is on ", code->device(), " but z is on ",
                z.device());
  }
  if (posterior_log_scale.has_value()) {
    const at::Tensor& p = *posterior_log_scale;
    TORCH_CHECK(code.has_value(), "code must be a [B, D] tensor (the posterior mean), got None");
    check_float(p, "posterior_log_scale");
    TORCH_CHECK(p.sizes() == z.sizes(), "posterior_log_scale has shape ", p.sizes(),
                " but z has shape ", z.sizes());
    TORCH_CHECK(p.scalar_type() == z.scalar_type(), "posterior_log_scale has dtype ",
                p.scalar_type(), " but z has dtype ", z.scalar_type());
    TORCH_CHECK(p.device() == z.device(), "posterior_log_scale is on ", p.device(),
                " but z is on ", z.device());
  }
}

void check_masked_topk_args(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                     const c10::optional<at::Tensor>& exclude_mask,
                     const c10::optional<at::Tensor>& exclude_index) {
  TORCH_CHECK(queries.dim() == 2, "queries must have shape [B, D], got ", queries.sizes());
  TORCH_CHECK(bank.dim() == 2, "bank must have shape [N, D], got ", bank.sizes());
  check_float(queries, "queries");
  TORCH_CHECK(bank.scalar_type() == queries.scalar_type(), "bank has dtype ", bank.scalar_type(),
              " but queries has dtype ", queries.scalar_type());
  TORCH_CHECK(bank.size(1) == queries.size(1), "bank has D=", bank.size(1), " but queries has D=",
              queries.size(1));
  TORCH_CHECK(bank.device() == queries.device(), "bank is on ", bank.device(),
              " but queries is on ", queries.device());
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(k <= kMaxK, "k=", k, " is above acn_kernels.MAX_K=", kMaxK);
  TORCH_CHECK(k <= bank.size(0), "k=", k, " is larger than the bank (N=", bank.size(0), ")");
  if (exclude_mask.has_value()) {
    TORCH_CHECK(exclude_mask->scalar_type() == at::kBool, "exclude_mask must be bool, got ",
                exclude_mask->scalar_type());
    TORCH_CHECK(exclude_mask->dim() == 1 && exclude_mask->size(0) == bank.size(0),
                "exclude_mask must have shape [N] = [", bank.size(0), "], got ",
                exclude_mask->sizes());
    TORCH_CHECK(exclude_mask->device() == queries.device(), "exclude_mask is on ",
                exclude_mask->device(), " but queries is on ", queries.device());
  }
  if (exclude_index.has_value()) {
    TORCH_CHECK(exclude_index->scalar_type() == at::kLong, "exclude_index must be int64, got ",
                exclude_index->scalar_type());
    TORCH_CHECK(exclude_index->dim() == 1 && exclude_index->size(0) == queries.size(0),
                "exclude_index must have shape [B] = [", queries.size(0), "], got ",
                exclude_index->sizes());
    TORCH_CHECK(exclude_index->device() == queries.device(), "exclude_index is on ",
                exclude_index->device(), " but queries is on ", queries.device());
  }
}

static void check_rows_tensor(const at::Tensor& t, const char* name, int64_t dim,
                              const char* shape) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_resolve_neighbours_args(const at::Tensor& candidates, const at::Tensor& index,
                                   const at::Tensor& uniforms, int64_t k,
                                   const c10::optional<at::Tensor>& fallback) {
  check_rows_tensor(candidates, "candidates", 2, "[B, C]");
  const int64_t B = candidates.size(0);
  check_rows_tensor(index, "index", 1, "[B]");
  TORCH_CHECK(index.size(0) == B, "index must have shape [B] = [", B, "], got ", index.sizes());
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat || uniforms.scalar_type() == at::kDouble,
              "uniforms must be float32 or float64, got ", uniforms.scalar_type());
  TORCH_CHECK(uniforms.dim() == 1 && uniforms.size(0) == B, "uniforms must have shape [B] = [", B,
              "], got ", uniforms.sizes());
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(k <= kMaxK, "k=", k, " is above acn_kernels.MAX_K=", kMaxK);
  const std::pair<const at::Tensor*, const char*> others[] = {{&index, "index"},
                                                              {&uniforms, "uniforms"}};
  for (const auto& [t, name] : others)
    TORCH_CHECK(t->device() == candidates.device(), name, " is on ", t->device(),
                " but candidates is on ", candidates.device());
  if (fallback.has_value()) {
    check_rows_tensor(*fallback, "fallback", 2, "[B, F]");
    TORCH_CHECK(fallback->size(0) == B, "fallback must have shape [B, F] with B = ", B, ", got ",
                fallback->sizes());
    TORCH_CHECK(fallback->device() == candidates.device(), "fallback is on ", fallback->device(),
                " but candidates is on ", candidates.device());
  }
}

}  // namespace acn
