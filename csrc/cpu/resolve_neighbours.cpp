// CPU kernel of the batch-order neighbour resolution (contract: docs/design.md,
// "resolve_neighbours"): one sequential walk over the batch, because query b's choice depends on
// the rows queries 0..b-1 took. The taken rows live in an open-addressing hash set
// (include/resolve_neighbours.h, shared with the CUDA kernel), so each candidate costs one or two
// probes of a table of at most 2B slots, whatever N. Query b reads its list only up to its k-th
// survivor (plus the last entry, to know whether the list was full).
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "../utils.h"
#include "resolve_neighbours.h"

namespace {

// The walk, with the uniforms in their own type (float or double; pick_slot works in double).
template <typename u_t>
void walk(int64_t B, int64_t C, int64_t F, int64_t k, const int64_t* cand, const int64_t* index,
          const u_t* u, const int64_t* fallback, int64_t* picks, int64_t* taken, int64_t* status) {
  const int64_t cap = acn::taken_capacity(B);
  std::vector<int64_t> slots(static_cast<size_t>(cap), -1);
  acn::TakenSet set{slots.data(), static_cast<uint64_t>(cap - 1)};
  std::vector<int64_t> mine(static_cast<size_t>(std::max<int64_t>(1, std::min(k, C))));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* list = cand + b * C;
    const int64_t own = index[b];
    int64_t n = 0;
    for (int64_t j = 0; j < C && n < k; ++j) {
      const int64_t r = list[j];
      if (r >= 0 && r != own && !set.contains(r)) mine[n++] = r;
    }
    if (n < k && acn::list_is_full(list, C)) {
      // Eligible rows may lie beyond the list, and this query's pick (unknown here) may be one
      // that a later query would take: the walk stops, and the caller searches again from b on.
      std::fill(picks + b, picks + B, int64_t(-1));
      std::fill(taken + b, taken + B, int64_t(-1));
      std::fill(status + b, status + B, acn::kNeedsSearch);
      return;
    }
    if (n > 0) {
      const int64_t r = mine[acn::pick_slot(static_cast<double>(u[b]), n)];
      set.insert(r);
      picks[b] = taken[b] = r;
      status[b] = acn::kResolved;
      continue;
    }
    // The end-of-pass fallback: any row of the fallback list but the own one; not taken.
    status[b] = acn::kFallback;
    taken[b] = -1;
    picks[b] = -1;
    if (fallback == nullptr) continue;
    const int64_t* fl = fallback + b * F;
    int64_t nf = 0;
    for (int64_t j = 0; j < F; ++j) nf += fl[j] >= 0 && fl[j] != own;
    if (nf == 0) continue;
    for (int64_t j = 0, want = acn::pick_slot(static_cast<double>(u[b]), nf);; ++j) {
      if (fl[j] >= 0 && fl[j] != own && want-- == 0) {
        picks[b] = fl[j];
        break;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> resolve_neighbours_cpu(
    const at::Tensor& candidates_, const at::Tensor& index_, const at::Tensor& uniforms_,
    int64_t k, const c10::optional<at::Tensor>& fallback_) {
  acn::check_resolve_neighbours_args(candidates_, index_, uniforms_, k, fallback_);
  TORCH_CHECK(candidates_.device().is_cpu(),
              "candidates must be a CPU tensor for the cpu backend, got ", candidates_.device());
  const auto cand = candidates_.contiguous(), index = index_.contiguous(),
             uniforms = uniforms_.contiguous();
  const at::Tensor fb = fallback_.has_value() ? fallback_->contiguous() : at::Tensor();
  const int64_t B = cand.size(0), C = cand.size(1), F = fb.defined() ? fb.size(1) : 0;
  const auto opts = cand.options();
  at::Tensor picks = acn::new_output({B}, opts), taken = acn::new_output({B}, opts),
             status = acn::new_output({B}, opts);
  if (B == 0) return {picks, taken, status};
  AT_DISPATCH_FLOATING_TYPES(uniforms.scalar_type(), "resolve_neighbours_cpu", [&] {
    walk<scalar_t>(B, C, F, k, cand.const_data_ptr<int64_t>(), index.const_data_ptr<int64_t>(),
                   uniforms.const_data_ptr<scalar_t>(),
                   fb.defined() ? fb.const_data_ptr<int64_t>() : nullptr,
                   picks.data_ptr<int64_t>(), taken.data_ptr<int64_t>(), status.data_ptr<int64_t>());
  });
  return {picks, taken, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(acn_kernels, CPU, m) { m.impl("resolve_neighbours", &resolve_neighbours_cpu); }
