// CUDA kernel of the batch-order neighbour resolution (contract: docs/design.md,
// "resolve_neighbours"; csrc/cpu/resolve_neighbours.cpp is the spec in code).
//
// The walk is sequential in the batch (query b may not take what 0..b-1 took), and B * C is
// small (a batch times K + headroom), so one warp does it all: for query b the 32 lanes test 32
// candidates at a time against the taken set (include/resolve_neighbours.h, the CPU kernel's
// table) and count the survivors with a ballot; a second scan finds the picked survivor, whose
// row is broadcast by a shuffle, and lane 0 alone inserts it and writes the outputs, so no two
// lanes ever write one address. __syncwarp orders lane 0's insert before the next query's
// probes. The set lives in shared memory up to kSharedSlots slots (batches up to 2048 queries),
// else in a global workspace; either way the kernel initialises it.
#include <cuda_runtime.h>

#include "launchers.h"
#include "resolve_neighbours.h"

namespace acn {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kSharedSlots = 4096;  // 32 KiB of int64, under the 48 KiB static limit

// Position of the n-th (0-based) set bit of a non-zero mask with more than n bits set.
__device__ __forceinline__ int nth_set_bit(unsigned mask, int n) {
  for (int i = 0; i < n; ++i) mask &= mask - 1;
  return __ffs(mask) - 1;
}

// How many entries of list[0, c) pass ok(row), counted up to `limit` (warp-uniform result).
template <typename Ok>
__device__ int64_t count_eligible(const int64_t* list, int64_t c, int64_t limit, Ok ok) {
  int64_t n = 0;
  for (int64_t c0 = 0; c0 < c && n < limit; c0 += kWarp) {
    const int64_t j = c0 + threadIdx.x;
    const int64_t r = j < c ? list[j] : -1;
    n += __popc(__ballot_sync(kFull, r >= 0 && ok(r)));
  }
  return n < limit ? n : limit;
}

// The want-th (0-based) entry of list[0, c) that passes ok(row), on every lane; the caller
// guarantees that there are more than `want` of them (count_eligible counted them), and the scan
// stops at the end of the list in any case.
template <typename Ok>
__device__ int64_t nth_eligible(const int64_t* list, int64_t c, int64_t want, Ok ok) {
  for (int64_t c0 = 0, before = 0; c0 < c; c0 += kWarp) {
    const int64_t j = c0 + threadIdx.x;
    const int64_t r = j < c ? list[j] : -1;
    const unsigned ballot = __ballot_sync(kFull, r >= 0 && ok(r));
    const int cnt = __popc(ballot);
    if (before + cnt > want) return __shfl_sync(kFull, r, nth_set_bit(ballot, int(want - before)));
    before += cnt;
  }
  return -1;
}

template <typename u_t>
__global__ void __launch_bounds__(kWarp)
    resolve_kernel(int64_t B, int64_t C, int64_t F, int64_t k, const int64_t* __restrict__ cand,
                   const int64_t* __restrict__ index, const u_t* __restrict__ u,
                   const int64_t* __restrict__ fallback, int64_t* __restrict__ picks,
                   int64_t* __restrict__ taken, int64_t* __restrict__ status,
                   int64_t* workspace) {
  __shared__ int64_t shared_slots[kSharedSlots];
  const int64_t cap = taken_capacity(B);
  int64_t* slots = workspace != nullptr ? workspace : shared_slots;
  for (int64_t s = threadIdx.x; s < cap; s += kWarp) slots[s] = -1;
  __syncwarp();
  TakenSet set{slots, static_cast<uint64_t>(cap - 1)};
  const bool lead = threadIdx.x == 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* list = cand + b * C;
    const int64_t own = index[b];
    const auto free_row = [&](int64_t r) { return r != own && !set.contains(r); };
    const int64_t n = count_eligible(list, C, k, free_row);
    if (n < k && list_is_full(list, C)) {
      // As on the CPU: the walk stops here; this query and every later one need a new search.
      for (int64_t q = b + threadIdx.x; q < B; q += kWarp) {
        picks[q] = -1;
        taken[q] = -1;
        status[q] = kNeedsSearch;
      }
      return;
    }
    const double ub = static_cast<double>(u[b]);
    if (n > 0) {
      const int64_t r = nth_eligible(list, C, pick_slot(ub, n), free_row);
      if (lead) {
        set.insert(r);
        picks[b] = taken[b] = r;
        status[b] = kResolved;
      }
      __syncwarp();  // the insert is visible to every lane's next probes
      continue;
    }
    // The end-of-pass fallback: any row of the fallback list but the own one; not taken.
    int64_t pick = -1;
    if (fallback != nullptr) {
      const int64_t* fl = fallback + b * F;
      const auto not_own = [&](int64_t r) { return r != own; };
      const int64_t nf = count_eligible(fl, F, F, not_own);
      if (nf > 0) pick = nth_eligible(fl, F, pick_slot(ub, nf), not_own);
    }
    if (lead) {
      picks[b] = pick;
      taken[b] = -1;
      status[b] = kFallback;
    }
  }
}

}  // namespace

int64_t resolve_neighbours_workspace(int64_t B) {
  const int64_t cap = taken_capacity(B);
  return cap > kSharedSlots ? cap : 0;
}

cudaError_t resolve_neighbours(int64_t B, int64_t C, int64_t F, int64_t k, const int64_t* candidates,
                               const int64_t* index, const void* uniforms, bool uniforms_double,
                               const int64_t* fallback, int64_t* picks, int64_t* taken,
                               int64_t* status, int64_t* workspace, cudaStream_t stream) {
  if (B < 1 || k < 1 || C < 0 || F < 0 || (resolve_neighbours_workspace(B) > 0) != (workspace != nullptr))
    return cudaErrorInvalidValue;
  if (uniforms_double)
    resolve_kernel<double><<<1, kWarp, 0, stream>>>(B, C, F, k, candidates, index,
                                                    static_cast<const double*>(uniforms), fallback,
                                                    picks, taken, status, workspace);
  else
    resolve_kernel<float><<<1, kWarp, 0, stream>>>(B, C, F, k, candidates, index,
                                                   static_cast<const float*>(uniforms), fallback,
                                                   picks, taken, status, workspace);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace acn
