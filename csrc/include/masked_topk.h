// Host/device selection primitives of the masked top-K, shared by the CPU and CUDA kernels.
// No torch headers (nvcc compiles it raw). Order: by (distance, row); padding = (+inf, -1).
#pragma once

#include <cfloat>
#include <cstdint>

#include "acn_math.h"

namespace acn {

// (da, ia) strictly before (db, ib): smaller distance, ties to the smaller row. Padding (-1) has
// distance +inf, and real rows always carry a finite distance, so it sorts last.
template <typename T>
ACN_HD bool topk_before(T da, int64_t ia, T db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

// The largest finite value of the accumulator type: what an overflowed finite pair reports.
template <typename T>
ACN_HD T max_finite_v();
template <>
ACN_HD float max_finite_v<float>() {
  return FLT_MAX;
}
template <>
ACN_HD double max_finite_v<double>() {
  return DBL_MAX;
}

// A finite pair's squared distance as the contract wants it: clamped at +0.0 (the expanded form
// |q|^2 + |b|^2 - 2 q.b can round below zero; -0.0 becomes +0.0) and the largest finite value
// (FLT_MAX for float, DBL_MAX for the float64 path, as the reference does) where it overflowed
// (only finite pairs reach here).
template <typename T>
ACN_HD T finish_dist(T v) {
  v = v > T(0) ? v : T(0);
  return v == inf_v<T>() ? max_finite_v<T>() : v;
}

// Insert (d, i) into the sorted list dist/idx of length k (ascending, padded with +inf / -1) if it
// belongs there; the caller has usually rejected most candidates already with one comparison
// against dist[k - 1]. O(k) shift, suited to small k and to per-thread lists on the GPU.
template <typename T>
ACN_HD void topk_insert_sorted(T* dist, int64_t* idx, int k, T d, int64_t i) {
  if (!topk_before(d, i, dist[k - 1], idx[k - 1])) return;
  int p = k - 1;
  while (p > 0 && topk_before(d, i, dist[p - 1], idx[p - 1])) {
    dist[p] = dist[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  dist[p] = d;
  idx[p] = i;
}

// Max-heap (root = worst kept candidate) of size k for large k: replace the root with (d, i)
// when (d, i) is before it, then sift down. O(log k) per accepted candidate.
template <typename T>
ACN_HD void topk_heap_replace_top(T* dist, int64_t* idx, int k, T d, int64_t i) {
  if (!topk_before(d, i, dist[0], idx[0])) return;
  int p = 0;
  for (;;) {
    int c = 2 * p + 1;
    if (c >= k) break;
    if (c + 1 < k && topk_before(dist[c], idx[c], dist[c + 1], idx[c + 1])) ++c;  // larger child
    if (!topk_before(d, i, dist[c], idx[c])) break;
    dist[p] = dist[c];
    idx[p] = idx[c];
    p = c;
  }
  dist[p] = d;
  idx[p] = i;
}

}  // namespace acn
