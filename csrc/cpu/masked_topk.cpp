// CPU kernel of the masked top-K neighbour search (contract: docs/design.md, "masked_topk").
//
// Plan of one call:
//  1. Per bank row, once: |b|^2 in the accumulation type, or NaN when the row is ineligible for
//     every query (masked, or holding NaN/inf). Per query: |q|^2, NaN when not finite.
//  2. Work items = (block of kQueryBlock queries) x (chunk of bank rows), run by at::parallel_for.
//     Splitting the bank into chunks keeps both cores busy when the batch is small (B=1 against a
//     large bank); each item keeps its own partial top-k list per query.
//  3. Inside an item (B > kDirectMaxB), bank tiles of eligible rows only are gathered (masked and
//     non-finite rows are dropped before any arithmetic), converted to the accumulation type, and
//     multiplied with the query block by one small GEMM (at::cpu::mm_out, i.e. MKL/oneDNN with
//     their run-time ISA dispatch), all in cache.
//  4. Selection over the GEMM tile: v = |b|^2 - 2 q.b is rejected with ONE comparison against a
//     per-query threshold (the current k-th distance plus a rounding band, below). The rare
//     survivors get their exact distance sum_d (q_d - b_d)^2 and enter the list (sorted insertion
//     for small k, a max-heap for large k; topk.h).
//     Small batches (B <= kDirectMaxB) skip the GEMM and the norms: each row is streamed once and
//     compared in the direct form with one comparison against each query's k-th distance.
//  5. Merge of the per-chunk lists of each query.
//
// The work items are compiled for AVX-512, AVX2 and the baseline and picked at run time (the
// extension's flags are the distribution's SSE2 baseline).
//
// Why the band: the expanded form |q|^2 + |b|^2 - 2 q.b rounds differently from the direct form,
// with an error that depends on where a row sits in the GEMM tile, so near-ties could be reordered
// and exact ties (duplicate rows) broken arbitrarily. The expanded form therefore only filters:
// a row is rejected only when it provably cannot beat the k-th exact distance, with the error bound
// alpha * kth + beta * (|q|^2 + |b|^2) + abs of the expanded form plus that of the exact one. Every distance that is
// reported or compared is the exact (direct-form) one, computed the same way for every position,
// so the result is the direct-form selection: ascending, ties to the smaller row. The band's
// derivation and constants: docs/filter-band.md, computed by filter_band.h.
//
// Extra memory: O(N) row norms, O(B * D) converted queries, O(B * k * chunks) partial lists and
// per-thread tiles; never B x N. All offsets are int64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../utils.h"
#include "cpu_isa.h"
#include "filter_band.h"
#include "masked_topk.h"

// No fused multiply-add contraction in this file: the AVX2/AVX-512 variants would otherwise fuse
// exact_dist's t * t + s in some inlined copies and not in others (vectorised group vs scalar
// tail), giving duplicate rows different distances and breaking the tie rule.
#pragma GCC optimize("fp-contract=off")

// Hot helpers are inlined into each ISA variant of the work items (below), so each variant gets
// them compiled for its own instruction set.
#define ACN_BODY inline __attribute__((always_inline))

namespace {

constexpr int64_t kQueryBlock = 64;     // queries per GEMM tile
constexpr int64_t kTileElems = 1 << 16;  // bank tile size in elements (rows * D): 256 KiB of floats
constexpr int64_t kMinTileRows = 64;
constexpr int64_t kMaxTileRows = 2048;
constexpr int kSortedMaxK = 32;  // sorted insertion up to this k, the heap above
constexpr int64_t kGroup = 16;   // the selection scan tests this many columns per branch
constexpr int64_t kDirectMaxB = 8;  // up to this many queries: the direct path, no GEMM (measured)

int64_t tile_rows(int64_t D) {
  return std::clamp<int64_t>(kTileElems / std::max<int64_t>(D, 1), kMinTileRows, kMaxTileRows);
}

constexpr int kLanes = 8;  // independent partial sums: vectorisable, in a fixed order

// Pairwise sum of the lanes, always in the same order.
template <typename acc_t>
ACN_BODY acc_t lane_sum(const acc_t* s) {
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

// The reported distance of a pair: sum_d (a_d - b_d)^2 in the direct form, with one fixed
// summation order, so that it does not depend on where the row sits (duplicate rows tie exactly).
template <typename acc_t>
ACN_BODY acc_t exact_dist(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t s[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t t = a[d + l] - b[d + l];
      s[l] += t * t;
    }
  acc_t tail = 0;
  for (; d < D; ++d) {
    const acc_t t = a[d] - b[d];
    tail += t * t;
  }
  return lane_sum(s) + tail;
}

// |x|^2 of a row, or NaN when it holds NaN/inf (x - x is NaN exactly for those; a finite row's
// norm may overflow to +inf and stays eligible).
template <typename acc_t>
ACN_BODY acc_t row_norm(const acc_t* x, int64_t D) {
  acc_t s[kLanes] = {}, z[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      s[l] += x[d + l] * x[d + l];
      z[l] += x[d + l] - x[d + l];
    }
  acc_t tail = 0, zt = 0;
  for (; d < D; ++d) {
    tail += x[d] * x[d];
    zt += x[d] - x[d];
  }
  const acc_t zero = lane_sum(z) + zt;
  return zero == acc_t(0) ? lane_sum(s) + tail : std::numeric_limits<acc_t>::quiet_NaN();
}

// Row r of the bank as acc_t: in place when it already is (contiguous, same type), else
// converted into buf.
template <typename scalar_t, typename acc_t>
ACN_BODY const acc_t* load_row(const scalar_t* bank, int64_t r, int64_t s0, int64_t s1, int64_t D,
                             acc_t* buf) {
  const scalar_t* src = bank + r * s0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (s1 == 1) return src;
  }
  if (s1 == 1) {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<acc_t>(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<acc_t>(src[d * s1]);
  }
  return buf;
}

// kGroup lanes as one GCC vector: lowered to zmm/ymm/xmm registers by each ISA variant (GCC 12
// does not vectorise the equivalent loop of 16 scalar comparisons with a reduction).
template <typename acc_t>
struct GroupVec {
  typedef acc_t type __attribute__((vector_size(kGroup * sizeof(acc_t))));
};

// Whether any column of the group has |b|^2 - 2 q.b <= thr (inputs free of NaN). The same two
// IEEE operations as the scalar test that follows, so the two agree exactly.
template <typename acc_t>
ACN_BODY bool group_any_le(const acc_t* tn, const acc_t* g, acc_t thr) {
  using V = typename GroupVec<acc_t>::type;
  V vt, vg;
  std::memcpy(&vt, tn, sizeof(V));
  std::memcpy(&vg, g, sizeof(V));
  const auto m = (vt - vg * acc_t(2)) <= thr;
  uint64_t w[sizeof(m) / sizeof(uint64_t)];
  std::memcpy(w, &m, sizeof(m));
  uint64_t any = 0;
  for (uint64_t x : w) any |= x;
  return any != 0;
}

template <typename acc_t>
struct Problem {
  int64_t B, N, D, k;
  int64_t bs0, bs1;      // bank strides (elements): any layout is read in place, never copied
  const acc_t* q;        // [B, D] queries in acc_t, contiguous
  const acc_t* qn;       // [B] |q|^2, NaN for a query that is not finite
  const acc_t* bn;       // [N] |b|^2, NaN for a row no query may pair with (GEMM path only)
  const bool* mask;      // [N] exclude_mask, or nullptr
  const int64_t* excl;   // [B] row each query skips (-1: none), or nullptr
  int64_t tile;          // bank rows per tile
  int64_t nchunks;       // bank chunks
  acc_t* part_d;         // [nchunks, B, k] partial lists, sorted ascending
  int64_t* part_i;
};

// The list of one query: sorted ascending for small k, a max-heap (root = worst) for large k.
template <typename acc_t>
struct QueryList {
  acc_t* d;
  int64_t* i;
  int k;
  bool heap;
  acc_t worst() const { return heap ? d[0] : d[k - 1]; }
  void insert(acc_t dist, int64_t row) const {
    if (heap)
      acn::topk_heap_replace_top(d, i, k, dist, row);
    else
      acn::topk_insert_sorted(d, i, k, dist, row);
  }
  // Heap order -> ascending (distance, row); padding (+inf, -1) ends up last.
  void finish() const {
    if (!heap) return;
    std::vector<std::pair<acc_t, int64_t>> tmp(k);
    for (int j = 0; j < k; ++j) tmp[j] = {d[j], i[j]};
    std::sort(tmp.begin(), tmp.end(), [](const auto& a, const auto& b) {
      return acn::topk_before(a.first, a.second, b.first, b.second);
    });
    for (int j = 0; j < k; ++j) {
      d[j] = tmp[j].first;
      i[j] = tmp[j].second;
    }
  }
};

template <typename acc_t>
QueryList<acc_t> query_list(const Problem<acc_t>& P, int64_t c, int64_t b) {
  const int64_t off = (c * P.B + b) * P.k;
  const int k = static_cast<int>(P.k);
  return QueryList<acc_t>{P.part_d + off, P.part_i + off, k, k > kSortedMaxK};
}

// Per-thread buffers, reused across the items a thread runs.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> tile, tile_norm, gram;
  std::vector<int64_t> rows;
  Scratch(int64_t tile_rows, int64_t D, bool gemm)
      : tile((gemm ? tile_rows : 1) * std::max<int64_t>(D, 1)), tile_norm(gemm ? tile_rows : 0),
        gram(gemm ? kQueryBlock * tile_rows : 0), rows(gemm ? tile_rows : 0) {}
};

// Small batches (B <= kDirectMaxB): every bank row is read once, straight from the bank, and
// compared with each query in the direct form; no precomputed norms, so the bank is streamed
// once (this case is memory-bound). e >= 0 always (a sum of squares), so finish_dist only has
// the overflow to map.
// Queries [q0, q1) against rows [r0, r1), into chunk c's partial lists.
template <typename scalar_t, typename acc_t>
ACN_BODY void search_item_direct(const Problem<acc_t>& P, const scalar_t* bank, int64_t q0, int64_t q1,
                        int64_t r0, int64_t r1, int64_t c, Scratch<acc_t>& S) {
  const int64_t D = P.D;
  acc_t worst[kDirectMaxB];
  int64_t skip[kDirectMaxB];
  int64_t nq = 0;
  QueryList<acc_t> lists[kDirectMaxB];
  const acc_t* qrows[kDirectMaxB];
  for (int64_t b = q0; b < q1; ++b) {
    const auto L = query_list(P, c, b);
    std::fill(L.d, L.d + L.k, acn::inf_v<acc_t>());
    std::fill(L.i, L.i + L.k, int64_t(-1));
    if (P.qn[b] != P.qn[b]) continue;  // a query holding NaN/inf pairs with nothing
    lists[nq] = L;
    worst[nq] = L.worst();
    skip[nq] = P.excl ? P.excl[b] : -1;
    qrows[nq] = P.q + b * D;
    ++nq;
  }
  if (nq > 0) {
    for (int64_t r = r0; r < r1; ++r) {
      if (P.mask && P.mask[r]) continue;
      // The bank is streamed once: fetch a few rows ahead of the arithmetic.
      __builtin_prefetch(bank + std::min(r + 8, r1 - 1) * P.bs0);
      const acc_t* row = load_row(bank, r, P.bs0, P.bs1, D, S.tile.data());
      for (int64_t j = 0; j < nq; ++j) {
        acc_t e = exact_dist(qrows[j], row, D);
        // With a finite query, a finite distance proves the row finite; only an infinite or
        // NaN one (overflow, or a NaN/inf in the row) needs the explicit check.
        if (!(e < acn::inf_v<acc_t>())) {
          const acc_t nr = row_norm(row, D);
          if (nr != nr) break;  // the row pairs with no query
          e = acn::finish_dist(e);
        }
        if (e > worst[j] || r == skip[j]) continue;
        lists[j].insert(e, r);
        worst[j] = lists[j].worst();
      }
    }
  }
  for (int64_t j = 0; j < nq; ++j) lists[j].finish();
}

// Larger batches: bank tiles of eligible rows against a block of queries by one GEMM, the
// expanded form as a one-comparison filter, the exact form for the survivors (see the top).
template <typename scalar_t, typename acc_t>
ACN_BODY void search_item_gemm(const Problem<acc_t>& P, const scalar_t* bank, int64_t q0, int64_t q1,
                      int64_t r0, int64_t r1, int64_t c, Scratch<acc_t>& S) {
  const int64_t D = P.D, nq = q1 - q0;
  // The filter's band (filter_band.h): operands used as they are (the GEMM in acc_t), not shifted.
  const acn::FilterBand band = acn::filter_band_for<acc_t>(D, acn::FilterInputs::kExact, false);
  const acc_t alpha = static_cast<acc_t>(band.alpha), beta = static_cast<acc_t>(band.beta),
              cabs = static_cast<acc_t>(band.abs);
  for (int64_t b = q0; b < q1; ++b) {
    const auto L = query_list(P, c, b);
    std::fill(L.d, L.d + L.k, acn::inf_v<acc_t>());
    std::fill(L.i, L.i + L.k, int64_t(-1));
  }
  const auto opts = c10::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor qt = at::from_blob(const_cast<acc_t*>(P.q + q0 * D), {nq, D}, opts);
  int64_t r = r0;
  while (r < r1) {
    // Gather the next tile of eligible rows (an ineligible one costs one load of its norm).
    int64_t n = 0;
    acc_t nb_max = 0;
    for (; r < r1 && n < P.tile; ++r) {
      const acc_t nb = P.bn[r];
      if (nb != nb) continue;
      acc_t* dst = S.tile.data() + n * D;
      const acc_t* src = load_row(bank, r, P.bs0, P.bs1, D, dst);
      if (src != dst) std::copy(src, src + D, dst);
      S.tile_norm[n] = nb;
      S.rows[n] = r;
      nb_max = std::max(nb_max, nb);
      ++n;
    }
    if (n == 0) break;
    at::Tensor gt = at::from_blob(S.gram.data(), {nq, n}, opts);
    at::cpu::mm_out(gt, qt, at::from_blob(S.tile.data(), {n, D}, opts).t());
    const acc_t* tn = S.tile_norm.data();
    for (int64_t b = q0; b < q1; ++b) {
      const acc_t qn = P.qn[b];
      if (qn != qn) continue;  // a query holding NaN/inf pairs with nothing
      const auto L = query_list(P, c, b);
      const acc_t* g = S.gram.data() + (b - q0) * n;
      const acc_t* qrow = P.q + b * D;
      const int64_t skip = P.excl ? P.excl[b] : -1;
      const acc_t base = beta * (qn + nb_max) + cabs - qn;
      // Reject when |b|^2 - 2 q.b > thr, i.e. expanded distance > kth + band. NaN or +inf from
      // overflow never satisfies ">" against +inf, so such pairs fall through to the exact path.
      acc_t thr = L.worst() * (1 + alpha) + base;
      auto consider = [&](int64_t j) {
        const int64_t row = S.rows[j];
        if (row == skip) return;
        L.insert(acn::finish_dist(exact_dist(qrow, S.tile.data() + j * D, D)), row);
        thr = L.worst() * (1 + alpha) + base;
      };
      int64_t j = 0;
      // With |q|^2 + |b|^2 far from overflow, v and thr hold no NaN, and a group of kGroup
      // columns is skipped after one SIMD comparison. Otherwise (huge inputs) every column takes
      // the NaN-safe test, so that overflowing pairs still reach the exact path.
      if ((qn + nb_max) * 4 < acn::max_finite_v<acc_t>()) {
        for (; j + kGroup <= n; j += kGroup) {
          if (!group_any_le(tn + j, g + j, thr)) continue;
          for (int64_t l = 0; l < kGroup; ++l)
            if (tn[j + l] - 2 * g[j + l] <= thr) consider(j + l);
        }
      }
      for (; j < n; ++j)
        if (!(tn[j] - 2 * g[j] > thr)) consider(j);
    }
  }
  for (int64_t b = q0; b < q1; ++b) query_list(P, c, b).finish();
}

// The item bodies compiled three times, for AVX-512, AVX2+FMA and the baseline, and picked at run
// time: the extension is built with the distribution's baseline flags (SSE2), which would leave
// the distance and scan loops 4 floats wide. Every variant computes the same function; within one
// process always the same variant runs, so distances stay position-independent.
#define ACN_ITEM_VARIANT(NAME, TARGET)                                                            \
  template <typename scalar_t, typename acc_t>                                                     \
  TARGET void NAME(bool gemm, const Problem<acc_t>& P, const scalar_t* bank, int64_t q0,           \
                   int64_t q1, int64_t r0, int64_t r1, int64_t c, Scratch<acc_t>& S) {             \
    if (gemm)                                                                                      \
      search_item_gemm<scalar_t, acc_t>(P, bank, q0, q1, r0, r1, c, S);                            \
    else                                                                                           \
      search_item_direct<scalar_t, acc_t>(P, bank, q0, q1, r0, r1, c, S);                          \
  }
ACN_ITEM_VARIANT(search_item_avx512, ACN_TARGET_AVX512)
ACN_ITEM_VARIANT(search_item_avx2, ACN_TARGET_AVX2)
ACN_ITEM_VARIANT(search_item_base, )
#undef ACN_ITEM_VARIANT

// Query b's final list from its nchunks sorted partial lists (a k-way merge).
template <typename acc_t>
void merge_query(const Problem<acc_t>& P, int64_t b, acc_t* out_d, int64_t* out_i) {
  const int64_t k = P.k, C = P.nchunks;
  std::vector<int64_t> head(C, 0);
  for (int64_t p = 0; p < k; ++p) {
    int64_t best = -1;
    acc_t bd = 0;
    int64_t bi = 0;
    for (int64_t c = 0; c < C; ++c) {
      if (head[c] >= k) continue;
      const int64_t off = (c * P.B + b) * k + head[c];
      if (best < 0 || acn::topk_before(P.part_d[off], P.part_i[off], bd, bi)) {
        best = c;
        bd = P.part_d[off];
        bi = P.part_i[off];
      }
    }
    ++head[best];
    out_d[b * k + p] = bd;
    out_i[b * k + p] = bi;
  }
}

template <typename scalar_t>
void run(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
         const c10::optional<at::Tensor>& exclude_mask,
         const c10::optional<at::Tensor>& exclude_index, at::Tensor& out_d, at::Tensor& out_i) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = queries.size(0), N = bank.size(0), D = queries.size(1);
  const at::Tensor q = queries.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const at::Tensor mask = exclude_mask.has_value() ? exclude_mask->contiguous() : at::Tensor();
  const at::Tensor excl = exclude_index.has_value() ? exclude_index->contiguous() : at::Tensor();
  const scalar_t* bp = bank.data_ptr<scalar_t>();
  const int64_t bs0 = bank.stride(0), bs1 = bank.stride(1);
  const acc_t* qp = q.data_ptr<acc_t>();
  const bool gemm = B > kDirectMaxB;

  std::vector<acc_t> qn(B), bn(gemm ? N : 0);
  for (int64_t b = 0; b < B; ++b) qn[b] = row_norm(qp + b * D, D);
  Problem<acc_t> P{B, N, D, k, bs0, bs1, qp, qn.data(), bn.data(),
                   mask.defined() ? mask.data_ptr<bool>() : nullptr,
                   excl.defined() ? excl.data_ptr<int64_t>() : nullptr, tile_rows(D), 1,
                   nullptr, nullptr};
  if (gemm) {
    at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(D, 1)),
                     [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(std::max<int64_t>(D, 1));
      for (int64_t r = r0; r < r1; ++r)
        bn[r] = P.mask && P.mask[r] ? std::numeric_limits<acc_t>::quiet_NaN()
                                    : row_norm(load_row(bp, r, bs0, bs1, D, buf.data()), D);
    });
  }

  // Enough items (4 per thread) that every thread has work even for one query block, and that
  // the dynamic hand-out below can balance; chunks no smaller than two tiles, so that the GEMM
  // and selection stay efficient.
  const int64_t qblock = gemm ? kQueryBlock : kDirectMaxB;
  const int64_t nqb = (B + qblock - 1) / qblock;
  const int64_t threads = at::get_num_threads();
  const int64_t want = threads > 1 ? (4 * threads + nqb - 1) / nqb : 1;
  P.nchunks = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, N / (2 * P.tile)));
  const int64_t chunk = (N + P.nchunks - 1) / P.nchunks;
  std::vector<acc_t> part_d(P.nchunks * B * k);
  std::vector<int64_t> part_i(P.nchunks * B * k);
  P.part_d = part_d.data();
  P.part_i = part_i.data();

  const acn::Isa isa = acn::cpu_isa();
  // Items are handed out dynamically (an atomic counter), not in static ranges: on a machine
  // shared with other processes one core is often slower, and a static split would wait for it.
  const int64_t items = nqb * P.nchunks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
    Scratch<acc_t> S(P.tile, D, gemm);
    for (int64_t w = next++; w < items; w = next++) {
      const int64_t qb = w / P.nchunks, c = w % P.nchunks;
      const int64_t q0 = qb * qblock, q1 = std::min(B, q0 + qblock);
      const int64_t r0 = std::min(N, c * chunk), r1 = std::min(N, r0 + chunk);
      switch (isa) {
        case acn::Isa::kAvx512:
          search_item_avx512<scalar_t, acc_t>(gemm, P, bp, q0, q1, r0, r1, c, S);
          break;
        case acn::Isa::kAvx2:
          search_item_avx2<scalar_t, acc_t>(gemm, P, bp, q0, q1, r0, r1, c, S);
          break;
        case acn::Isa::kBase:
          search_item_base<scalar_t, acc_t>(gemm, P, bp, q0, q1, r0, r1, c, S);
          break;
      }
    }
  });

  acc_t* od = out_d.data_ptr<acc_t>();
  int64_t* oi = out_i.data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / (k * P.nchunks)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) merge_query(P, b, od, oi);
  });
}

std::tuple<at::Tensor, at::Tensor> masked_topk_cpu(const at::Tensor& queries,
                                                   const at::Tensor& bank, int64_t k,
                                                   const c10::optional<at::Tensor>& exclude_mask,
                                                   const c10::optional<at::Tensor>& exclude_index) {
  acn::check_masked_topk_args(queries, bank, k, exclude_mask, exclude_index);
  TORCH_CHECK(queries.device().is_cpu(), "queries must be a CPU tensor for the cpu backend, got ",
              queries.device());
  const int64_t B = queries.size(0);
  const auto acc = acn::acc_dtype(queries.scalar_type());
  at::Tensor out_d = acn::new_output({B, k}, queries.options().dtype(acc));
  at::Tensor out_i = acn::new_output({B, k}, queries.options().dtype(at::kLong));
  if (B == 0) return {out_d, out_i};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(),
                                  "masked_topk_cpu", [&] {
    run<scalar_t>(queries, bank, k, exclude_mask, exclude_index, out_d, out_i);
  });
  return {out_d, out_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(acn_kernels, CPU, m) { m.impl("masked_topk", &masked_topk_cpu); }
