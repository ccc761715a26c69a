// Host/device primitives of the batch-order neighbour resolution, shared by the CPU kernel
// (csrc/cpu/resolve_neighbours.cpp, the spec in code) and the CUDA kernel
// (csrc/cuda/resolve_neighbours.cu). No torch headers (nvcc compiles it raw).
// Contract: docs/design.md, "resolve_neighbours".
#pragma once

#include <cstdint>

#include "acn_math.h"

namespace acn {

// Per-query status codes (acn_kernels.checks.RESOLVED / NEEDS_SEARCH / FALLBACK).
constexpr int64_t kResolved = 0;     // picked one of its candidates; the row is taken
constexpr int64_t kNeedsSearch = 1;  // lost too many candidates (or follows such a query)
constexpr int64_t kFallback = 2;     // no eligible candidate: the end-of-pass fallback

// The pick among n >= 1 options for the uniform u: floor(u * n) computed in double (exact for
// float32 and float64 u in [0, 1), as int(u * n) in Python), clamped into [0, n - 1] so that a
// u outside [0, 1), or NaN (which goes to 0), can never select outside the list.
ACN_HD int64_t pick_slot(double u, int64_t n) {
  const double x = u * static_cast<double>(n);
  if (!(x >= 1.0)) return 0;  // [0, 1), negative or NaN
  if (x >= static_cast<double>(n)) return n - 1;
  return static_cast<int64_t>(x);  // truncation is floor for x >= 1
}

// A candidate list is "full" when its last entry is a row: the search may have cut off eligible
// rows beyond it. A list with padding (-1) at the end holds every eligible row there was.
ACN_HD bool list_is_full(const int64_t* list, int64_t c) { return c > 0 && list[c - 1] >= 0; }

// Slots of the taken set for a batch of b queries: a power of two >= 2 b, so the open-addressing
// table stays at most half full and every probe sequence ends at an empty slot.
ACN_HD int64_t taken_capacity(int64_t b) {
  int64_t cap = 2;
  while (cap < 2 * b) cap *= 2;
  return cap;
}

// The rows taken so far in one call: open addressing with linear probing over `slots`
// (capacity = mask + 1, from taken_capacity, every slot initialised to -1). Rows are >= 0, so -1
// marks an empty slot; rows are never removed. Host memory on the CPU, shared (or global) memory
// on the GPU, where many lanes may call contains() at once while no lane inserts.
struct TakenSet {
  int64_t* slots;
  uint64_t mask;

  ACN_HD static uint64_t hash(int64_t row) {
    // Fibonacci hashing: consecutive rows (the common case: nearby codes) spread over the table.
    const uint64_t h = static_cast<uint64_t>(row) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
  }

  ACN_HD bool contains(int64_t row) const {
    for (uint64_t s = hash(row) & mask;; s = (s + 1) & mask) {
      const int64_t v = slots[s];
      if (v == row) return true;
      if (v < 0) return false;
    }
  }

  // Inserts a row that is not in the set yet (the walk only inserts rows it found absent).
  ACN_HD void insert(int64_t row) {
    uint64_t s = hash(row) & mask;
    while (slots[s] >= 0) s = (s + 1) & mask;
    slots[s] = row;
  }
};

}  // namespace acn
