// The one TORCH_LIBRARY block: every schema of the acn_kernels namespace.
// Backend files add implementations with TORCH_LIBRARY_IMPL(acn_kernels, CPU|CUDA, m).
// Shapes, dtypes and edge cases are the contracts of docs/design.md; the Python side validates
// arguments (acn_kernels/checks.py) and registers fake kernels and autograd
// (acn_kernels/registration.py).
#include "utils.h"
#include "resolve_neighbours.h"

#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <thread>

TORCH_LIBRARY(acn_kernels, m) {
  // Mixture log-likelihood. Returns (out, lse):
  //   lse [B, D, 2] = (T, Lz) per element (acn_math.h; log p(z_d | mixture_d) = T - Lz), float32,
  //   float64 for float64 inputs, saved for backward;
  //   out = log p per dimension, or summed over D ([B]) when per_dim is false. With `code` given,
  //   the KL estimate log q(z) - log p replaces log p in `out`: q = N(code, I), or with
  //   `posterior_log_scale` [B, D] (only with code) N(code, diag(exp(2 posterior_log_scale))).
  //   The log-scale comes last, with a default, so that calls written before it still work.
  m.def(
      "mixture_fwd(Tensor z, Tensor logits, Tensor means, Tensor log_scales, Tensor? code, "
      "bool per_dim, Tensor? posterior_log_scale=None) -> (Tensor, Tensor)");
  // Gradients of `out` given grad_out (shape of out), in one pass:
  //   (dz, dlogits, dmeans, dlog_scales, dcode, dposterior_log_scale); dcode is an empty tensor
  //   when code is None, dposterior_log_scale when posterior_log_scale is None. Recomputes the
  //   responsibilities from the inputs and lse.
  m.def(
      "mixture_bwd(Tensor grad_out, Tensor z, Tensor logits, Tensor means, Tensor log_scales, "
      "Tensor? code, Tensor lse, bool per_dim, Tensor? posterior_log_scale=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Masked top-k: (dists [B, k], indices [B, k] int64); see docs/design.md for masks, ties, padding.
  m.def(
      "masked_topk(Tensor queries, Tensor bank, int k, Tensor? exclude_mask, "
      "Tensor? exclude_index) -> (Tensor, Tensor)");
  // Batch-order neighbour resolution over masked_topk's candidate lists: (picks [B], taken [B],
  // status [B]), all int64; see docs/design.md, "resolve_neighbours".
  m.def(
      "resolve_neighbours(Tensor candidates, Tensor index, Tensor uniforms, int k, "
      "Tensor? fallback) -> (Tensor, Tensor, Tensor)");
}

namespace acn {

bool& poison_outputs_flag() {
  static bool flag = false;
  return flag;
}

}  // namespace acn

namespace {

bool built_with_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

bool built_with_cuda() {
#if defined(ACN_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

// How many distinct threads an at::parallel_for over `n` items ran on: a test compares it with
// torch.get_num_threads(), which catches an extension built without -fopenmp (one thread).
int64_t parallel_threads_seen(int64_t n) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    volatile double sink = 0;  // enough work per chunk that every worker picks one up
    for (int64_t i = b; i < e; ++i)
      for (int j = 0; j < 200000; ++j) sink = sink + j;
    std::lock_guard<std::mutex> g(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_openmp", &built_with_openmp);
  m.def("built_with_cuda", &built_with_cuda);
  m.def("parallel_threads_seen", &parallel_threads_seen);
  m.def("set_poison_outputs", [](bool on) { acn::poison_outputs_flag() = on; });
  m.attr("MAX_K") = acn::kMaxK;
  m.attr("RESOLVE_STATUS") = pybind11::make_tuple(acn::kResolved, acn::kNeedsSearch, acn::kFallback);
}
