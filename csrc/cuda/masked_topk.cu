// CUDA kernels of the masked top-k neighbour search (contract: docs/design.md, "masked_topk").
//
// Two partial kernels give each (block of queries, bank split) a sorted list of its k best rows;
// a merge tree reduces the lists of each query. The plan (masked_topk_plan) picks the path.
//
// Tensor-core path (float32/float16/bfloat16 inputs, sm_80 and up, B >= kTcMinB, tiles that fit
// in shared memory):
//  1. Row statistics (one warp per row): a row is eligible when it is not masked and finite;
//     its filter term h_b = (|b|^2 (1 - beta) - eta |b|_1) / 2, or -inf when |b|^2 >= 2^120 (the
//     filter's quantities could overflow: such a row is never rejected). The eligible rows are
//     compacted, in row order, by a three-kernel scan; masked rows cost no arithmetic after that.
//     The splits divide the compacted rows evenly (their count is read on the device).
//  2. Partial kernel, one block per (tile of QT = 64 or 128 queries, split), 8 warps: the query
//     tile stays in shared memory; bank tiles of BT rows are staged by cp.async, double-buffered
//     (16-byte copies when rows are 16-byte multiples and aligned, plain loads otherwise), each
//     tile's row ids and h_b one tile ahead. Each warp multiplies a 32 x (BT / WN) block on the
//     tensor cores (mma.sync m16n8k8 TF32 for float32, m16n8k16 f16/bf16 for half inputs, fp32
//     accumulators), its fragments loaded by ldmatrix (row stride 4 mod 16 words: no bank
//     conflicts). float32 operands are truncated to TF32.
//  3. Filter: g = <q, b> on the tensor cores only *filters*; a pair is rejected when
//     g - h_b < lim_q, the test of docs/filter-band.md (csrc/include/filter_band.h, operands
//     not centred) divided by -2, with lim_q = -(tau (1 + alpha) + (beta - 1) |q|^2 + eta |q|_1
//     + abs) / 2 from the query's current k-th distance tau (-inf while it holds fewer than k
//     rows, or when |q|^2 >= 2^120: nothing is rejected). NaN never rejects. So a pair whose
//     direct-form distance is <= tau always survives.
//  4. Survivors (row, column) are compacted into a queue in shared memory (warp-aggregated), then
//     rescored by the whole block while the tile is still staged: sum_d (q_d - b_d)^2 in float32
//     in the CPU kernel's order (8 lanes, a tail, a fixed pairwise sum; no FMA contraction), so the
//     distances are bit-identical to csrc/cpu/masked_topk.cpp's. Those that beat the k-th (by
//     distance, ties to the smaller row) go to the query's buffer, as one 64-bit key: the
//     distance's bits over the row's offset in its split (unsigned order = (distance, row) order).
//  5. Selection as in the SIMT kernel: threshold, buffer, bitonic flush (sort the buffer; the
//     elementwise minimum of the ascending list and the reversed buffer is bitonic and holds the
//     smallest of both; a bitonic merge sorts it). With 64-128 queries per block the lists (kpad
//     keys) and buffers (W keys) live in the global workspace; a flush stages them in shared
//     memory, `flush_groups` queries at a time. A tile adds at most BT keys to a buffer, which is
//     flushed once it could overflow in the next tile. At the end the lists become (distance, row).
//
// SIMT path (float64, older GPUs, small batches, large D): the existing exact kernel (below),
// one bank row per thread, the direct form for every pair, the same selection in shared memory.
//
// Merge tree: each block merges up to kMergeFanIn sorted lists of one query (the min/bitonic
// merge above), level after level, so that B = 1 against a large bank (a thousand splits) is
// merged by many blocks in a few levels; the last level writes the outputs.
//
// Memory: the partial lists and buffers, O(B * k * splits) (splits capped), and on the tensor-core
// path O(N) row statistics and compacted row ids; never B x N. All offsets are 64-bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "acn_math.h"
#include "device_utils.cuh"
#include "filter_band.h"
#include "launchers.h"
#include "masked_topk.h"

namespace acn {
namespace cuda {
namespace {

// =============================================================================================
// SIMT path: the exact direct-form kernel and its shared-memory selection.

constexpr int kThreads = 256;  // threads per block
constexpr int kTile = kThreads;  // bank rows per tile: one per thread
constexpr int kMaxQB = 8;  // queries per block at most (one warp each when scanning them)
// Cap on the partial lists, in entries (splits * B * k), to bound the workspace memory.
constexpr int64_t kMaxPartialEntries = int64_t(1) << 24;
// Lists merged per block and level of the merge tree.
constexpr int kMergeFanIn = 16;

// Dimensions staged per chunk: 16 KiB of tile in both precisions.
template <typename acc_t>
constexpr int tile_dims() {
  return sizeof(acc_t) == 4 ? 16 : 8;
}

// 16-byte vectors of the accumulation type, for the broadcast reads of the staged queries.
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  using type = float4;
  static constexpr int width = 4;
  __device__ static float get(const float4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
};
template <>
struct Vec<double> {
  using type = double2;
  static constexpr int width = 2;
  __device__ static double get(const double2& v, int i) { return i == 0 ? v.x : v.y; }
};

__host__ __device__ inline size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

__host__ __device__ inline int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Shared-memory layout of the selection state of `qb` queries (lists and buffers), optionally
// preceded by the bank tile and query chunk of the partial kernel. Byte offsets, host and device.
struct SelectLayout {
  size_t list_d, list_i, buf_d, buf_i, count, tile, qs, total;
};

__host__ __device__ inline SelectLayout select_layout(int qb, int kpad, int cap, size_t acc_size,
                                                      size_t idx_size, int td) {
  SelectLayout l;
  size_t off = 0;
  l.list_d = off;
  off = align16(off + size_t(qb) * kpad * acc_size);
  l.list_i = off;
  off = align16(off + size_t(qb) * kpad * idx_size);
  l.buf_d = off;
  off = align16(off + size_t(qb) * cap * acc_size);
  l.buf_i = off;
  off = align16(off + size_t(qb) * cap * idx_size);
  l.count = off;
  off = align16(off + size_t(qb) * sizeof(int));
  l.tile = off;
  off = align16(off + size_t(td) * (kTile + 1) * acc_size);  // +1: conflict-free transposed stores
  l.qs = off;
  off = align16(off + size_t(qb) * td * acc_size);
  l.total = off;
  return l;
}

// Buffer capacity: at least the list length (the merge reads Kpad buffer entries) and at least
// two rounds of candidates (each round adds at most one per thread, and a buffer is flushed once
// it holds more than cap - kThreads), rounded to a power of two for the bitonic sort.
__host__ __device__ inline int buffer_cap(int kpad) { return kpad > 2 * kThreads ? kpad : 2 * kThreads; }

// The running top-k of QB queries in shared memory. IdxT: int32 row offsets within a split in the
// partial kernel (halves the shared memory), int64 rows in the merge kernel.
template <typename acc_t, typename IdxT, int QB>
struct BlockSelect {
  acc_t* list_d;  // [QB][kpad], ascending by (dist, row); padding (+inf, -1)
  IdxT* list_i;
  acc_t* buf_d;  // [QB][cap], unsorted survivors of the threshold test
  IdxT* buf_i;
  int* count;  // [QB]
  int k, kpad, cap;

  __device__ BlockSelect(unsigned char* smem, const SelectLayout& l, int k_, int kpad_, int cap_)
      : list_d(reinterpret_cast<acc_t*>(smem + l.list_d)),
        list_i(reinterpret_cast<IdxT*>(smem + l.list_i)),
        buf_d(reinterpret_cast<acc_t*>(smem + l.buf_d)),
        buf_i(reinterpret_cast<IdxT*>(smem + l.buf_i)),
        count(reinterpret_cast<int*>(smem + l.count)),
        k(k_),
        kpad(kpad_),
        cap(cap_) {}

  // Block-wide; followed by a barrier before the first offer.
  __device__ void init() {
    for (int e = threadIdx.x; e < QB * kpad; e += blockDim.x) {
      list_d[e] = inf_v<acc_t>();
      list_i[e] = IdxT(-1);
    }
    for (int q = threadIdx.x; q < QB; q += blockDim.x) count[q] = 0;
  }

  // One thread, one candidate of query q; the list is stable between barriers, so the threshold
  // read needs no synchronisation.
  __device__ void offer(int q, acc_t d, IdxT i) {
    const int t = q * kpad + k - 1;
    if (!topk_before(d, int64_t(i), list_d[t], int64_t(list_i[t]))) return;
    const int pos = atomicAdd(&count[q], 1);
    buf_d[q * cap + pos] = d;
    buf_i[q * cap + pos] = i;
  }

  // Block-wide, at the end of a round of offers (at most one per thread and query): flushes when
  // some buffer could overflow in the next round or, with `final`, holds anything. The decision
  // reads the counts between two barriers, so it is the same in every thread, and no thread
  // offers again before all have read them.
  __device__ void end_round(bool final) {
    __syncthreads();
    const int limit = final ? 0 : cap - kThreads;
    bool full = false;
    for (int q = 0; q < QB; ++q) full = full || count[q] > limit;
    __syncthreads();
    if (full) flush();
  }

  __device__ static void cmp_swap(acc_t* d, IdxT* ix, int a, int b, bool ascending) {
    const acc_t da = d[a], db = d[b];
    const IdxT ia = ix[a], ib = ix[b];
    if (topk_before(db, int64_t(ib), da, int64_t(ia)) == ascending) {
      d[a] = db;
      d[b] = da;
      ix[a] = ib;
      ix[b] = ia;
    }
  }

  // Block-wide (all threads, uniform call, after a barrier): sort the buffers, merge them into the
  // lists, empty them. Queries with an empty buffer skip the work but not the barriers.
  __device__ void flush() {
    for (int e = threadIdx.x; e < QB * cap; e += blockDim.x) {
      const int q = e / cap, j = e % cap;
      if (j >= count[q]) {
        buf_d[e] = inf_v<acc_t>();
        buf_i[e] = IdxT(-1);
      }
    }
    __syncthreads();
    const int half = cap / 2;
    for (int size = 2; size <= cap; size <<= 1) {
      for (int stride = size / 2; stride > 0; stride >>= 1) {
        for (int e = threadIdx.x; e < QB * half; e += blockDim.x) {
          const int q = e / half, t = e % half;
          if (count[q] == 0) continue;
          const int a = 2 * t - (t & (stride - 1));
          cmp_swap(buf_d + q * cap, buf_i + q * cap, a, a + stride, (a & size) == 0);
        }
        __syncthreads();
      }
    }
    // list[j] = min(list[j], buf[kpad - 1 - j]): bitonic, and holds the kpad smallest of both.
    for (int e = threadIdx.x; e < QB * kpad; e += blockDim.x) {
      const int q = e / kpad, j = e % kpad;
      if (count[q] == 0) continue;
      const int s = q * cap + kpad - 1 - j;
      if (topk_before(buf_d[s], int64_t(buf_i[s]), list_d[e], int64_t(list_i[e]))) {
        list_d[e] = buf_d[s];
        list_i[e] = buf_i[s];
      }
    }
    __syncthreads();
    const int lhalf = kpad / 2;
    for (int stride = lhalf; stride > 0; stride >>= 1) {
      for (int e = threadIdx.x; e < QB * lhalf; e += blockDim.x) {
        const int q = e / lhalf, t = e % lhalf;
        if (count[q] == 0) continue;
        const int a = 2 * t - (t & (stride - 1));
        cmp_swap(list_d + q * kpad, list_i + q * kpad, a, a + stride, true);
      }
      __syncthreads();
    }
    for (int q = threadIdx.x; q < QB; q += blockDim.x) count[q] = 0;
    __syncthreads();
  }
};

struct TopkArgs {
  int64_t B, N, D;
  int k, kpad, cap;
  int64_t split_rows, splits;
};

// Two blocks per SM for float accumulators: lets ptxas use up to 128 registers (QB accumulators,
// the staged chunk of the thread's row, the exclusions) without spilling; one for double, whose
// accumulators and staged chunk take twice the registers.
template <typename scalar_t, int QB>
__global__ void __launch_bounds__(kThreads, sizeof(acc_type_t<scalar_t>) == 8 ? 1 : 2)
    topk_partial_kernel(TopkArgs a, const scalar_t* __restrict__ queries,
                        const scalar_t* __restrict__ bank, const bool* __restrict__ exclude_mask,
                        const int64_t* __restrict__ exclude_index,
                        acc_type_t<scalar_t>* __restrict__ out_d, int64_t* __restrict__ out_i) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int TD = tile_dims<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const SelectLayout l = select_layout(QB, a.kpad, a.cap, sizeof(acc_t), sizeof(int32_t), TD);
  BlockSelect<acc_t, int32_t, QB> sel(smem, l, a.k, a.kpad, a.cap);
  acc_t* tile = reinterpret_cast<acc_t*>(smem + l.tile);  // [TD][kTile + 1]
  acc_t* qs = reinterpret_cast<acc_t*>(smem + l.qs);      // [QB][TD]
  __shared__ int q_ok[QB];

  const int64_t split = int64_t(blockIdx.x) % a.splits;
  const int64_t q0 = int64_t(blockIdx.x) / a.splits * QB;
  const int64_t row_begin = split * a.split_rows;
  const int64_t row_end = min(a.N, row_begin + a.split_rows);
  const int tid = threadIdx.x;

  sel.init();
  // A query holding NaN or inf is never paired: one warp scans each query.
  for (int q = tid / 32; q < QB; q += kThreads / 32) {
    bool ok = q0 + q < a.B;
    if (ok)
      for (int64_t d = tid % 32; d < a.D; d += 32) ok = ok && isfinite(to_acc(queries[(q0 + q) * a.D + d]));
    ok = __all_sync(0xffffffffu, ok);
    if (tid % 32 == 0) q_ok[q] = ok;
  }
  int64_t excl[QB];
#pragma unroll
  for (int q = 0; q < QB; ++q) excl[q] = (exclude_index && q0 + q < a.B) ? exclude_index[q0 + q] : -1;
  __syncthreads();
  bool qok[QB];
#pragma unroll
  for (int q = 0; q < QB; ++q) qok[q] = q_ok[q];

  for (int64_t t0 = row_begin; t0 < row_end; t0 += kTile) {
    const int64_t row = t0 + tid;
    const int rows = int(min(int64_t(kTile), row_end - t0));
    acc_t acc[QB];
#pragma unroll
    for (int q = 0; q < QB; ++q) acc[q] = 0;
    bool row_finite = true;
    for (int64_t d0 = 0; d0 < a.D; d0 += TD) {
      const int td = int(min(int64_t(TD), a.D - d0));
      __syncthreads();  // the previous chunk's readers are done with tile and qs
      // Coalesced: consecutive threads read consecutive elements of the [rows, td] block. Both
      // tile and qs are zero-filled up to TD, which adds nothing to the sums and lets the inner
      // loop run a compile-time trip count.
      for (int e = tid; e < kTile * TD; e += kThreads) {
        const int r = e / TD, dd = e % TD;
        tile[dd * (kTile + 1) + r] =
            (r < rows && dd < td) ? to_acc(bank[(t0 + r) * a.D + d0 + dd]) : acc_t(0);
      }
      for (int e = tid; e < QB * TD; e += kThreads) {
        const int q = e / TD, dd = e % TD;
        qs[e] = (q0 + q < a.B && dd < td) ? to_acc(queries[(q0 + q) * a.D + d0 + dd]) : acc_t(0);
      }
      __syncthreads();
      acc_t bv[TD];
#pragma unroll
      for (int dd = 0; dd < TD; ++dd) {
        bv[dd] = tile[dd * (kTile + 1) + tid];
        row_finite = row_finite && isfinite(bv[dd]);
      }
      // The query values are the same for every thread (broadcast reads); vector loads keep the
      // shared-memory traffic well below the arithmetic.
#pragma unroll
      for (int q = 0; q < QB; ++q) {
#pragma unroll
        for (int v = 0; v < TD / Vec<acc_t>::width; ++v) {
          const typename Vec<acc_t>::type qv = reinterpret_cast<const typename Vec<acc_t>::type*>(qs + q * TD)[v];
#pragma unroll
          for (int w = 0; w < Vec<acc_t>::width; ++w) {
            const acc_t diff = Vec<acc_t>::get(qv, w) - bv[v * Vec<acc_t>::width + w];
            acc[q] += diff * diff;
          }
        }
      }
    }
    const bool row_ok = tid < rows && row_finite && !(exclude_mask && exclude_mask[row]);
    if (row_ok) {
#pragma unroll
      for (int q = 0; q < QB; ++q)
        if (qok[q] && row != excl[q]) sel.offer(q, finish_dist(acc[q]), int32_t(row - row_begin));
    }
    sel.end_round(false);
  }
  sel.end_round(true);

  // With one split this is the answer; otherwise the [B, splits, k] partial lists of the merge tree.
  for (int e = tid; e < QB * a.k; e += kThreads) {
    const int q = e / a.k, j = e % a.k;
    if (q0 + q >= a.B) continue;
    const int32_t li = sel.list_i[q * a.kpad + j];
    const int64_t o = ((q0 + q) * a.splits + split) * a.k + j;
    out_d[o] = sel.list_d[q * a.kpad + j];
    out_i[o] = li < 0 ? int64_t(-1) : row_begin + li;
  }
}

// =============================================================================================
// Merge tree: level after level, each block merges up to kMergeFanIn sorted lists of one query.

struct MergeArgs {
  int64_t s_in, s_out;  // lists of k entries per query in and out (s_out = ceil(s_in / kMergeFanIn))
  int k, kpad;
};

// Block (b, g) merges input lists g * kMergeFanIn ... of query b into output list g of
// [B, s_out, k] (the final [B, k] outputs when s_out == 1). Input lists are ascending by
// (distance, row) and padded with (+inf, -1); each is folded into the running list by the
// min/bitonic merge, so the result is the k smallest of all of them in the same order. (Two blocks
// per SM in the bounds: without a minimum, ptxas squeezed the float version into 32 registers
// and spilled.)
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
    topk_merge_kernel(MergeArgs a, const acc_t* __restrict__ src_d, const int64_t* __restrict__ src_i,
                      acc_t* __restrict__ dst_d, int64_t* __restrict__ dst_i) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* ld = reinterpret_cast<acc_t*>(smem);
  int64_t* li = reinterpret_cast<int64_t*>(smem + align16(size_t(a.kpad) * sizeof(acc_t)));
  const int64_t b = int64_t(blockIdx.x) / a.s_out, g = int64_t(blockIdx.x) % a.s_out;
  const int64_t j0 = g * kMergeFanIn, j1 = min(a.s_in, j0 + kMergeFanIn);
  const int tid = threadIdx.x;
  {
    const int64_t base = (b * a.s_in + j0) * a.k;
    for (int i = tid; i < a.kpad; i += kThreads) {
      ld[i] = i < a.k ? src_d[base + i] : inf_v<acc_t>();
      li[i] = i < a.k ? src_i[base + i] : int64_t(-1);
    }
  }
  __syncthreads();
  for (int64_t j = j0 + 1; j < j1; ++j) {
    // list[i] = min(list[i], next[kpad - 1 - i]): bitonic, and holds the kpad smallest of both
    // (entries of `next` past k are padding, i.e. never smaller).
    const int64_t base = (b * a.s_in + j) * a.k;
    for (int i = tid; i < a.kpad; i += kThreads) {
      const int s = a.kpad - 1 - i;
      if (s >= a.k) continue;
      const acc_t d = src_d[base + s];
      const int64_t r = src_i[base + s];
      if (topk_before(d, r, ld[i], li[i])) {
        ld[i] = d;
        li[i] = r;
      }
    }
    __syncthreads();
    const int half = a.kpad / 2;
    for (int stride = half; stride > 0; stride >>= 1) {
      for (int t = tid; t < half; t += kThreads) {
        const int x = 2 * t - (t & (stride - 1)), y = x + stride;
        if (topk_before(ld[y], li[y], ld[x], li[x])) {
          const acc_t d = ld[x];
          const int64_t r = li[x];
          ld[x] = ld[y];
          li[x] = li[y];
          ld[y] = d;
          li[y] = r;
        }
      }
      __syncthreads();
    }
  }
  const int64_t out = (b * a.s_out + g) * a.k;
  for (int i = tid; i < a.k; i += kThreads) {
    dst_d[out + i] = ld[i];
    dst_i[out + i] = li[i];
  }
}

size_t merge_smem(size_t acc_bytes, int kpad) {
  return align16(size_t(kpad) * acc_bytes) + size_t(kpad) * sizeof(int64_t);
}

// =============================================================================================
// Tensor-core path.

constexpr int kTcThreads = 256;  // 8 warps
constexpr int kTcWarps = kTcThreads / 32;
constexpr int64_t kTcMinB = 32;            // smaller batches take the SIMT path (the bank is read once there too)
constexpr int64_t kRowChunk = 2048;        // rows per block of the row-statistics and compaction kernels
constexpr int64_t kMaxTcEntries = int64_t(1) << 25;  // cap on B * splits * (kpad + W): lists and buffers
constexpr size_t kMaxFlushScratch = 64 * 1024;       // shared memory for the lists a flush merges at once
// A row or query is filtered only while its squared norm is below this: every quantity of the
// test then stays finite (docs/filter-band.md, "Non-finite and huge values").
constexpr float kSafeNorm = 0x1p120f;

// Query states of the partial kernel.
constexpr int kQueryNever = 0;   // past the batch, or holding NaN/inf: pairs with nothing
constexpr int kQueryOk = 1;      // filtered
constexpr int kQueryUnsafe = 2;  // |q|^2 >= 2^120: never rejected, every pair rescored

// The band of docs/filter-band.md as the kernels use it, rounded once from the doubles.
struct Band {
  float opa;  // 1 + alpha
  float bm1;  // beta - 1
  float omb;  // 1 - beta
  float eta;
  float abs;
};

Band make_band(DType dt, int64_t D) {
  const FilterInputs in =
      dt == DType::kFloat32 ? FilterInputs::kTF32 : (dt == DType::kFloat16 ? FilterInputs::kFP16 : FilterInputs::kBF16);
  // The operands are the inputs themselves (not centred): the staged tile then serves both the
  // MMA and the exact rescoring, and half inputs reach the tensor cores unrounded.
  const FilterBand f = filter_band_for<float>(D, in, false);
  return Band{float(1.0 + f.alpha), float(f.beta - 1.0), float(1.0 - f.beta), float(f.eta), float(f.abs)};
}

// h_b of a row from its squared norm and 1-norm: (ny (1 - beta) - eta l1y) / 2, or -inf (never
// rejected) when the norm is not safe.
__device__ __forceinline__ float row_term(float ny, float l1y, const Band& band) {
  if (!(ny < kSafeNorm)) return -inf_v<float>();
  return __fmul_rn(__fsub_rn(__fmul_rn(ny, band.omb), __fmul_rn(band.eta, l1y)), 0.5f);
}

// lim_q from the query's state and current k-th distance tau.
__device__ __forceinline__ float query_limit(int state, float tau, float nx, float l1x, const Band& band) {
  if (state == kQueryNever) return inf_v<float>();
  if (state == kQueryUnsafe || tau == inf_v<float>()) return -inf_v<float>();
  float v = __fmul_rn(tau, band.opa);
  v = __fadd_rn(v, __fmul_rn(band.bm1, nx));
  v = __fadd_rn(v, __fmul_rn(band.eta, l1x));
  v = __fadd_rn(v, band.abs);
  return __fmul_rn(-v, 0.5f);
}

// One warp's finiteness, squared norm and L1 norm of a row of D values (lanes over the dimensions,
// then a butterfly, so every lane holds the results): the band's inputs for bank rows and queries.
template <typename scalar_t>
__device__ __forceinline__ bool warp_row_norms(const scalar_t* x, int64_t D, int lane, float* sq, float* l1) {
  bool fin = true;
  float s = 0.0f, a = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = to_acc(x[d]);
    fin = fin && isfinite(v);
    s += v * v;
    a += fabsf(v);
  }
  fin = __all_sync(0xffffffffu, fin);
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, o);
    a += __shfl_xor_sync(0xffffffffu, a, o);
  }
  *sq = s;
  *l1 = a;
  return fin;
}

// 1. Per row: h_b (NaN marks a row no query may pair with: masked or not finite) and, per chunk of
// kRowChunk rows, the number of eligible rows. One warp per row, lanes over the dimensions (the
// norms may be summed in any order, docs/filter-band.md).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tc_row_stats_kernel(int64_t N, int64_t D, const scalar_t* __restrict__ bank,
                        const bool* __restrict__ exclude_mask, Band band, float* __restrict__ h_all,
                        int64_t* __restrict__ chunk_count) {
  __shared__ int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r0 = int64_t(blockIdx.x) * kRowChunk, r1 = min(N, r0 + kRowChunk);
  int eligible = 0;
  for (int64_t r = r0 + warp; r < r1; r += kThreads / 32) {
    float s, l1;
    const bool fin = warp_row_norms(bank + r * D, D, lane, &s, &l1);
    if (lane == 0) {
      const bool ok = fin && !(exclude_mask && exclude_mask[r]);
      h_all[r] = ok ? row_term(s, l1, band) : __int_as_float(0x7fffffff);
      eligible += ok;
    }
  }
  if (lane == 0 && eligible > 0) atomicAdd(&count, eligible);
  __syncthreads();
  if (threadIdx.x == 0) chunk_count[blockIdx.x] = count;
}

// 2. In place: chunk counts -> exclusive offsets; offsets[chunks] = the number of eligible rows.
// One block (the chunks are few: N / 2048).
__global__ void __launch_bounds__(kThreads) tc_scan_kernel(int64_t chunks, int64_t* __restrict__ offsets) {
  __shared__ int64_t warp_sum[kThreads / 32];
  __shared__ int64_t carry;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < chunks; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < chunks ? offsets[i] : 0;
    int64_t x = v;  // inclusive scan within the warp
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_sum[warp] = x;
    __syncthreads();
    int64_t off = carry;
    for (int w = 0; w < warp; ++w) off += warp_sum[w];
    if (i < chunks) offsets[i] = off + x - v;
    __syncthreads();  // every thread has read carry and warp_sum
    if (threadIdx.x == kThreads - 1) carry = off + x;  // the last thread's inclusive sum: the block's total
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[chunks] = carry;
}

// 3. The eligible rows of each chunk, in row order, at its offset: row ids and h_b.
__global__ void __launch_bounds__(kThreads)
    tc_compact_kernel(int64_t N, const float* __restrict__ h_all, const int64_t* __restrict__ offsets,
                      int64_t* __restrict__ rows, float* __restrict__ rows_h) {
  __shared__ int warp_count[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r0 = int64_t(blockIdx.x) * kRowChunk, r1 = min(N, r0 + kRowChunk);
  int64_t out = offsets[blockIdx.x];
  for (int64_t base = r0; base < r1; base += kThreads) {
    const int64_t r = base + threadIdx.x;
    const float h = r < r1 ? h_all[r] : __int_as_float(0x7fffffff);
    const bool keep = h == h;
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    if (keep) {
      const int64_t p = out + before + __popc(ballot & ((1u << lane) - 1u));
      rows[p] = r;
      rows_h[p] = h;
    }
    out += total;
    __syncthreads();  // warp_count is read before the next round writes it
  }
}

struct TcArgs {
  int64_t B, N, D;
  int k, kpad;       // list length, and rounded up to a power of two
  int w;             // buffer capacity per query (a power of two, >= 2 * BT and >= kpad)
  int sw;            // staged row stride in 32-bit words (4 mod 16: conflict-free ldmatrix)
  int kchunks;       // 16-word chunks of a row that the MMA loop covers (zero-padded)
  int groups;        // queries merged at once by a flush
  int vec;           // 1: rows are staged with 16-byte copies
  int64_t splits, qtiles;
  Band band;
  const int64_t* eligible;  // [1] number of compacted rows
  const int64_t* rows;      // [eligible] compacted row ids, ascending
  const float* rows_h;      // [eligible] their h_b
  uint64_t* lists;          // [B, splits, kpad] keys, ascending
  uint64_t* bufs;           // [B, splits, w] keys, unsorted
  float* out_d;             // [B, splits, k] (the outputs [B, k] when splits == 1)
  int64_t* out_i;
};

// A candidate of a split as one 64-bit key: the distance's bits (distances are >= +0.0, so their
// bits order as unsigned integers) over its compacted row's offset from the split's first (the
// compaction keeps row order, and a split holds fewer than 2^31 rows): unsigned order is
// (distance, row) order, ties to the smaller row. kNoKey (all ones) pads, after every key.
constexpr uint64_t kNoKey = ~uint64_t(0);

__device__ __forceinline__ uint64_t make_key(float d, int64_t offset) {
  return (uint64_t(__float_as_uint(d)) << 32) | uint64_t(offset);
}
__device__ __forceinline__ float key_dist(uint64_t key) {
  return key == kNoKey ? inf_v<float>() : __uint_as_float(unsigned(key >> 32));
}

// Shared-memory layout of the partial kernel, byte offsets (host and device).
struct TcLayout {
  size_t qrows, bank, meta_rows, meta_h, lim, kth, nx, l1x, state, excl, cnt, flushed, flist, queue, scal,
      scratch, total;
};

__host__ __device__ inline TcLayout tc_layout(int qt, int bt, int sw, int kpad, int w, int groups) {
  TcLayout l;
  size_t off = 0;
  l.qrows = off;      // [qt][sw] words: the query tile, as given
  off = align16(off + size_t(qt) * sw * 4);
  l.bank = off;       // [2][bt][sw] words: two bank tiles
  off = align16(off + size_t(2) * bt * sw * 4);
  l.meta_rows = off;  // [3][bt] int64: row ids of three tiles (computed, staged, next)
  off = align16(off + size_t(3) * bt * 8);
  l.meta_h = off;     // [3][bt] float: their h_b
  off = align16(off + size_t(3) * bt * 4);
  l.lim = off;        // [qt] float: lim_q
  off = align16(off + size_t(qt) * 4);
  l.kth = off;        // [qt] uint64: the key of the current k-th
  off = align16(off + size_t(qt) * 8);
  l.nx = off;         // [qt] float: |q|^2, |q|_1
  off = align16(off + size_t(qt) * 4);
  l.l1x = off;
  off = align16(off + size_t(qt) * 4);
  l.state = off;      // [qt] int: kQueryNever / kQueryOk / kQueryUnsafe
  off = align16(off + size_t(qt) * 4);
  l.excl = off;       // [qt] int64: the row each query skips
  off = align16(off + size_t(qt) * 8);
  l.cnt = off;        // [qt] int: entries in the query's buffer
  off = align16(off + size_t(qt) * 4);
  l.flushed = off;    // [qt] int: whether the query's list has been written
  off = align16(off + size_t(qt) * 4);
  l.flist = off;      // [qt] int: queries of the current flush
  off = align16(off + size_t(qt) * 4);
  l.queue = off;      // [qt * bt] uint16: the survivors of a tile, query * bt + column
  off = align16(off + size_t(qt) * bt * 2);
  l.scal = off;       // int: queue length, flush wanted, flush count, flush width
  off = align16(off + 4 * sizeof(int));
  l.scratch = off;    // [groups][kpad + w] uint64: lists and buffers being merged
  off = align16(off + size_t(groups) * (kpad + w) * 8);
  l.total = off;
  return l;
}

// A staged word as the MMA takes it: float32 truncated to TF32 (the low 13 mantissa bits
// cleared: an error below 2^-10 relative, the band's tf32 model); half words as they are.
template <typename scalar_t>
__device__ __forceinline__ unsigned mma_word(unsigned w) {
  return std::is_same<scalar_t, float>::value ? (w & 0xffffe000u) : w;
}

template <typename scalar_t>
__device__ __forceinline__ void mma_m16n8(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
  if constexpr (std::is_same<scalar_t, float>::value)
    mma_tf32_m16n8k8(d, a0, a1, a2, a3, b0, b1);
  else if constexpr (std::is_same<scalar_t, __half>::value)
    mma_f16_m16n8k16(d, a0, a1, a2, a3, b0, b1);
  else
    mma_bf16_m16n8k16(d, a0, a1, a2, a3, b0, b1);
}

// Eight consecutive staged elements (16-byte aligned) as float.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <typename half_t>
__device__ __forceinline__ void load8(const half_t* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const half_t* h = reinterpret_cast<const half_t*>(&u);
#pragma unroll
  for (int l = 0; l < 8; ++l) v[l] = to_acc(h[l]);
}

// The reported distance of a pair, in the CPU kernel's order (csrc/cpu/masked_topk.cpp,
// exact_dist): lane l sums d = l, l + 8, ... over the whole groups of 8, a tail sums the rest in
// order, and the result is ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7)) + tail, each
// operation rounded on its own (the _rn intrinsics are never contracted into FMAs). x and y are
// staged rows (16-byte aligned). finish_dist maps an overflow to FLT_MAX.
template <typename scalar_t>
__device__ float direct_dist(const scalar_t* x, const scalar_t* y, int64_t D) {
  float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    float xv[8], yv[8];
    load8(x + d, xv);
    load8(y + d, yv);
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      const float t = __fsub_rn(xv[l], yv[l]);
      s[l] = __fadd_rn(s[l], __fmul_rn(t, t));
    }
  }
  float tail = 0.0f;
  for (; d < D; ++d) {
    const float t = __fsub_rn(to_acc(x[d]), to_acc(y[d]));
    tail = __fadd_rn(tail, __fmul_rn(t, t));
  }
  const float lanes = __fadd_rn(__fadd_rn(__fadd_rn(s[0], s[4]), __fadd_rn(s[1], s[5])),
                                __fadd_rn(__fadd_rn(s[2], s[6]), __fadd_rn(s[3], s[7])));
  return finish_dist(__fadd_rn(lanes, tail));
}

// Stages `n` rows of D elements into shared memory rows of `sw` words: row r comes from
// src + row(r) * D. 16-byte asynchronous copies when `vec` (D * sizeof(scalar_t) a multiple of 16
// and src 16-byte aligned), plain element copies otherwise. Warps over rows, lanes over a row (no
// division in the loops); when a row's vectors divide 32, a warp copies 32 / vpr rows per step,
// so that no lane idles. Elements past D are never written (zero from the start).
template <typename scalar_t, typename RowOf>
__device__ __forceinline__ void stage_rows(unsigned* dst, int sw, const scalar_t* src, int64_t D, int n,
                                           bool vec, RowOf row_of) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (vec) {
    const int vpr = int(D * int64_t(sizeof(scalar_t)) / 16);
    if (vpr <= 32 && (vpr & (vpr - 1)) == 0) {
      // lane = sub * vpr + v; rows warp * per + sub + j * 8 * per: each (row, vector) once.
      const int shift = __ffs(vpr) - 1, per = 32 >> shift, v = lane & (vpr - 1);
      for (int r = warp * per + (lane >> shift); r < n; r += kTcWarps * per)
        cp_async<16>(dst + r * sw + v * 4, reinterpret_cast<const char*>(src + row_of(r) * D) + v * 16);
      return;
    }
    for (int r = warp; r < n; r += kTcWarps) {
      const char* s = reinterpret_cast<const char*>(src + row_of(r) * D);
      for (int v = lane; v < vpr; v += 32) cp_async<16>(dst + r * sw + v * 4, s + v * 16);
    }
  } else {
    scalar_t* de = reinterpret_cast<scalar_t*>(dst);
    const int swe = sw * int(4 / sizeof(scalar_t));
    for (int r = warp; r < n; r += kTcWarps) {
      const scalar_t* s = src + row_of(r) * D;
      for (int64_t d = lane; d < D; d += 32) de[r * swe + d] = s[d];
    }
  }
}

// Compare-exchange of keys x < y: into ascending order, or descending when !ascending.
__device__ __forceinline__ void cmp_swap(uint64_t* key, int x, int y, bool ascending) {
  const uint64_t a = key[x], b = key[y];
  if ((b < a) == ascending) {
    key[x] = b;
    key[y] = a;
  }
}

// The partial kernel's shared state, carved from the dynamic shared memory.
struct TcShared {
  unsigned* qrows;
  unsigned* bank;
  int64_t* meta_rows;
  float* meta_h;
  float* lim;
  uint64_t* kth;
  float* nx;
  float* l1x;
  int* state;
  int64_t* excl;
  int* cnt;
  int* flushed;
  int* flist;
  uint16_t* queue;
  int* scal;  // [0] queue length, [1] flush wanted, [2] queries to flush, [3] flush width
  uint64_t* scratch;

  __device__ TcShared(unsigned char* s, const TcLayout& l)
      : qrows(reinterpret_cast<unsigned*>(s + l.qrows)),
        bank(reinterpret_cast<unsigned*>(s + l.bank)),
        meta_rows(reinterpret_cast<int64_t*>(s + l.meta_rows)),
        meta_h(reinterpret_cast<float*>(s + l.meta_h)),
        lim(reinterpret_cast<float*>(s + l.lim)),
        kth(reinterpret_cast<uint64_t*>(s + l.kth)),
        nx(reinterpret_cast<float*>(s + l.nx)),
        l1x(reinterpret_cast<float*>(s + l.l1x)),
        state(reinterpret_cast<int*>(s + l.state)),
        excl(reinterpret_cast<int64_t*>(s + l.excl)),
        cnt(reinterpret_cast<int*>(s + l.cnt)),
        flushed(reinterpret_cast<int*>(s + l.flushed)),
        flist(reinterpret_cast<int*>(s + l.flist)),
        queue(reinterpret_cast<uint16_t*>(s + l.queue)),
        scal(reinterpret_cast<int*>(s + l.scal)),
        scratch(reinterpret_cast<uint64_t*>(s + l.scratch)) {}
};

// Block-wide (uniform call): merges the buffer of every query that has entries into its list,
// `groups` queries at a time in shared memory, and refreshes their k-th and lim. List and buffer
// of query q live at ((q0 + q) * splits + split) * {kpad, w}. (Inlined: as a call, the kernel's
// arguments and shared-memory pointers would live on the stack and be reloaded in the tile loop.)
template <int QT>
__device__ void tc_flush(const TcArgs& a, const TcShared& s, int64_t q0, int64_t split) {
  const int tid = threadIdx.x;
  __syncthreads();  // every thread has read the flag that called the flush, and filled the buffers
  if (tid == 0) {
    s.scal[1] = 0;
    s.scal[2] = 0;
  }
  __syncthreads();
  for (int q = tid; q < QT; q += kTcThreads)
    if (s.cnt[q] > 0) s.flist[atomicAdd(&s.scal[2], 1)] = q;
  __syncthreads();
  const int nf = s.scal[2];
  const int per = a.kpad + a.w;
  for (int g0 = 0; g0 < nf; g0 += a.groups) {
    const int gn = min(a.groups, nf - g0);
    if (tid == 0) {
      int most = 1;
      for (int m = 0; m < gn; ++m) most = max(most, s.cnt[s.flist[g0 + m]]);
      s.scal[3] = next_pow2(most);  // <= w: a buffer never holds more than w entries
    }
    __syncthreads();
    const int wq = s.scal[3];
    for (int e = tid; e < gn * a.kpad; e += kTcThreads) {
      const int m = e / a.kpad, j = e % a.kpad, q = s.flist[g0 + m];
      s.scratch[m * per + j] = s.flushed[q] ? a.lists[((q0 + q) * a.splits + split) * a.kpad + j] : kNoKey;
    }
    for (int e = tid; e < gn * wq; e += kTcThreads) {
      const int m = e / wq, j = e % wq, q = s.flist[g0 + m];
      s.scratch[m * per + a.kpad + j] = j < s.cnt[q] ? a.bufs[((q0 + q) * a.splits + split) * a.w + j] : kNoKey;
    }
    __syncthreads();
    // Sort the buffers ascending (bitonic: blocks of `size` alternate in direction until the last).
    const int half = wq / 2;
    for (int size = 2; size <= wq; size <<= 1) {
      for (int stride = size / 2; stride > 0; stride >>= 1) {
        for (int e = tid; e < gn * half; e += kTcThreads) {
          const int m = e / half, t = e % half;
          const int x = 2 * t - (t & (stride - 1));
          cmp_swap(s.scratch + m * per + a.kpad, x, x + stride, (x & size) == 0);
        }
        __syncthreads();
      }
    }
    // list[j] = min(list[j], buf[kpad - 1 - j]) (buffer entries past wq are kNoKey): bitonic, and
    // holds the kpad smallest of both.
    for (int e = tid; e < gn * a.kpad; e += kTcThreads) {
      const int m = e / a.kpad, j = e % a.kpad, b = a.kpad - 1 - j;
      if (b < wq) {
        uint64_t* l = s.scratch + m * per;
        l[j] = min(l[j], l[a.kpad + b]);
      }
    }
    __syncthreads();
    const int lhalf = a.kpad / 2;
    for (int stride = lhalf; stride > 0; stride >>= 1) {
      for (int e = tid; e < gn * lhalf; e += kTcThreads) {
        const int m = e / lhalf, t = e % lhalf;
        const int x = 2 * t - (t & (stride - 1));
        cmp_swap(s.scratch + m * per, x, x + stride, true);
      }
      __syncthreads();
    }
    for (int e = tid; e < gn * a.kpad; e += kTcThreads) {
      const int m = e / a.kpad, j = e % a.kpad, q = s.flist[g0 + m];
      a.lists[((q0 + q) * a.splits + split) * a.kpad + j] = s.scratch[m * per + j];
    }
    for (int m = tid; m < gn; m += kTcThreads) {
      const int q = s.flist[g0 + m];
      s.kth[q] = s.scratch[m * per + a.k - 1];
      s.lim[q] = query_limit(s.state[q], key_dist(s.kth[q]), s.nx[q], s.l1x[q], a.band);
      s.cnt[q] = 0;
      s.flushed[q] = 1;
    }
    __syncthreads();  // the scratch and the counts are reused by the next group
  }
}

// 4. The partial kernel: block (query tile, split), QT queries against the split's compacted rows
// in tiles of BT. Warps: WM along the queries (32 each: two m16 tiles), WN along the tile's rows
// (WCOLS each: NI n8 tiles).
template <typename scalar_t, int QT, int BT>
__global__ void __launch_bounds__(kTcThreads, 1)
    tc_partial_kernel(TcArgs a, const scalar_t* __restrict__ queries, const scalar_t* __restrict__ bank,
                      const int64_t* __restrict__ exclude_index) {
  // Below sm_80 the copy and MMA primitives compile to nothing; the plan never launches this
  // kernel there (it checks the PTX version the kernel was built from), and a launch would trap.
  if (!ACN_SM80) __trap();
  constexpr int WM = QT / 32, WN = kTcWarps / WM, WCOLS = BT / WN, NI = WCOLS / 8;
  static_assert(WM * 32 == QT && WM * WN == kTcWarps && NI * 8 * WN == BT && NI >= 1, "tile shape");
  static_assert(2 * NI * 4 <= 32, "a thread's survivors must fit one 32-bit mask");
  static_assert(QT * BT <= 65536, "queue entries are 16-bit");
  constexpr int EPW = 4 / int(sizeof(scalar_t));  // elements per staged word
  extern __shared__ __align__(16) unsigned char smem[];
  const TcLayout layout = tc_layout(QT, BT, a.sw, a.kpad, a.w, a.groups);
  const TcShared s(smem, layout);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int wq = warp % WM, wn = warp / WM;
  const int swe = a.sw * EPW;  // staged row stride in elements
  const int64_t qtile = int64_t(blockIdx.x) % a.qtiles, split = int64_t(blockIdx.x) / a.qtiles;
  const int64_t q0 = qtile * QT;
  const int nq = int(min(int64_t(QT), a.B - q0));
  // The split's share of the compacted rows [p0, p1), balanced by the device-side count.
  const int64_t M = *a.eligible;
  const int64_t per = M / a.splits, rem = M % a.splits;
  const int64_t p0 = split * per + min(split, rem);
  const int64_t p1 = p0 + per + (split < rem ? 1 : 0);
  const int64_t tiles = (p1 - p0 + BT - 1) / BT;

  // Zero the staged rows: the dimensions past D (the MMA reads up to a multiple of 16 words) and
  // the queries past the batch must read as zero; bank rows past a tile's end are never used.
  for (int e = tid; e < QT * a.sw; e += kTcThreads) s.qrows[e] = 0u;
  for (int e = tid; e < 2 * BT * a.sw; e += kTcThreads) s.bank[e] = 0u;
  __syncthreads();
  stage_rows(s.qrows, a.sw, queries, a.D, nq, a.vec != 0, [&](int r) { return q0 + r; });
  // Row ids and h_b of tile i go to meta slot i % 3 one tile before its rows are staged.
  auto stage_meta = [&](int64_t i) {
    const int64_t p = p0 + i * BT;
    if (tid < min(int64_t(BT), p1 - p)) {
      const int slot = int(i % 3);
      cp_async<8>(s.meta_rows + slot * BT + tid, a.rows + p + tid);
      cp_async<4>(s.meta_h + slot * BT + tid, a.rows_h + p + tid);
    }
  };
  auto stage_tile = [&](int64_t i) {
    const int n = int(min(int64_t(BT), p1 - (p0 + i * BT)));
    const int64_t* ids = s.meta_rows + int(i % 3) * BT;
    stage_rows(s.bank + int(i & 1) * BT * a.sw, a.sw, bank, a.D, n, a.vec != 0, [&](int r) { return ids[r]; });
  };
  if (tiles > 0) stage_meta(0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // Per query: norms, finiteness and safety (one warp per query), the initial threshold.
  for (int q = warp; q < QT; q += kTcWarps) {
    const scalar_t* x = reinterpret_cast<const scalar_t*>(s.qrows) + q * swe;
    float sq, l1;
    const bool fin = warp_row_norms(x, a.D, lane, &sq, &l1);
    if (lane == 0) {
      const int st = (q < nq && fin) ? (sq < kSafeNorm ? kQueryOk : kQueryUnsafe) : kQueryNever;
      s.state[q] = st;
      s.nx[q] = sq;
      s.l1x[q] = l1;
      s.kth[q] = kNoKey;
      s.lim[q] = query_limit(st, inf_v<float>(), sq, l1, a.band);
      s.cnt[q] = 0;
      s.flushed[q] = 0;
      s.excl[q] = (exclude_index && q < nq) ? exclude_index[q0 + q] : int64_t(-1);
    }
  }
  if (tid == 0) {
    s.scal[0] = 0;
    s.scal[1] = 0;
  }
  if (tiles > 0) stage_tile(0);
  if (tiles > 1) stage_meta(1);
  cp_async_commit();

  for (int64_t i = 0; i < tiles; ++i) {
    // Tile i and the row ids of tile i + 1 have landed; every thread is past tile i - 1.
    cp_async_wait_all();
    __syncthreads();
    const int slot = int(i % 3);
    const int n = int(min(int64_t(BT), p1 - (p0 + i * BT)));
    if (i + 1 < tiles) stage_tile(i + 1);
    if (i + 2 < tiles) stage_meta(i + 2);
    cp_async_commit();
    const unsigned* tile = s.bank + int(i & 1) * BT * a.sw;

    // g = <q, b> for the warp's 32 x WCOLS block, 16 words of the rows (two k-steps: 8 words
    // each, i.e. 8 dims of float32 or 16 of half) per chunk. ldmatrix hands every lane its
    // fragments in MMA register order: for A (queries, m16 tile mi, k-step h) the matrices are
    // rows +0..7 and +8..15 at words +0 and +4 of the step; for B (bank rows, n8 tile ni) rows
    // +0..7 at words +0, +4 (step 0) and +8, +12 (step 1).
    float acc[2][NI][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
    {
      const int mat = lane / 8, rr = lane % 8;
      const unsigned* a_row[2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        a_row[mi] = s.qrows + (wq * 32 + mi * 16 + (mat & 1) * 8 + rr) * a.sw + (mat >> 1) * 4;
      const unsigned* b_row[NI];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) b_row[ni] = tile + (wn * WCOLS + ni * 8 + rr) * a.sw + mat * 4;
      for (int c = 0; c < a.kchunks; ++c) {
        unsigned af[2][2][4], bf[NI][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) ldmatrix_x4(af[mi][h], a_row[mi] + c * 16 + h * 8);
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) ldmatrix_x4(bf[ni], b_row[ni] + c * 16);
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
              mma_m16n8<scalar_t>(acc[mi][ni], mma_word<scalar_t>(af[mi][h][0]), mma_word<scalar_t>(af[mi][h][1]),
                                  mma_word<scalar_t>(af[mi][h][2]), mma_word<scalar_t>(af[mi][h][3]),
                                  mma_word<scalar_t>(bf[ni][2 * h]), mma_word<scalar_t>(bf[ni][2 * h + 1]));
      }
    }

    // The filter. Element e of acc[mi][ni] is query row wq*32 + mi*16 + g + 8*(e/2), tile column
    // wn*WCOLS + ni*8 + 2t + e%2. A pair survives unless g - h_b < lim_q (NaN survives).
    {
      const float* th = s.meta_h + slot * BT;
      float lr[2][2];
      bool okr[2][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int row = wq * 32 + mi * 16 + hh * 8 + g;
          lr[mi][hh] = s.lim[row];
          okr[mi][hh] = s.state[row] != kQueryNever;
        }
      float hc[NI][2];
      bool vc[NI][2];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int el = 0; el < 2; ++el) {
          const int col = wn * WCOLS + ni * 8 + 2 * t + el;
          vc[ni][el] = col < n;
          hc[ni][el] = th[col];
        }
      unsigned mask = 0u;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool sv = okr[mi][e >> 1] && vc[ni][e & 1] &&
                            !(__fsub_rn(acc[mi][ni][e], hc[ni][e & 1]) < lr[mi][e >> 1]);
            mask |= unsigned(sv) << ((mi * NI + ni) * 4 + e);
          }
      if (__any_sync(0xffffffffu, mask != 0u)) {
        // Warp-aggregated append: one atomic per warp, survivors at consecutive positions.
        const int c = __popc(mask);
        int incl = c;
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += y;
        }
        int base = 0;
        if (lane == 31) base = atomicAdd(&s.scal[0], incl);
        base = __shfl_sync(0xffffffffu, base, 31);
        int pos = base + incl - c;
        while (mask != 0u) {
          const int bit = __ffs(mask) - 1;
          mask &= mask - 1u;
          const int mi = bit / (NI * 4), ni = (bit / 4) % NI, e = bit % 4;
          const int row = wq * 32 + mi * 16 + (e >> 1) * 8 + g;
          const int col = wn * WCOLS + ni * 8 + 2 * t + (e & 1);
          s.queue[pos++] = uint16_t(row * BT + col);
        }
      }
    }
    __syncthreads();

    // Rescore the survivors while the tile is staged; those before the k-th enter the buffer.
    {
      const int queued = s.scal[0];
      const int64_t* ids = s.meta_rows + slot * BT;
      for (int e = tid; e < queued; e += kTcThreads) {
        const int v = s.queue[e], q = v / BT, col = v % BT;
        const int64_t row = ids[col];
        if (row == s.excl[q]) continue;
        const float d = direct_dist(reinterpret_cast<const scalar_t*>(s.qrows) + q * swe,
                                    reinterpret_cast<const scalar_t*>(tile) + col * swe, a.D);
        const uint64_t key = make_key(d, i * BT + col);
        if (!(key < s.kth[q])) continue;
        const int pos = atomicAdd(&s.cnt[q], 1);
        a.bufs[((q0 + q) * a.splits + split) * a.w + pos] = key;
        if (pos + 1 > a.w - BT) s.scal[1] = 1;  // the next tile could overflow this buffer
      }
    }
    __syncthreads();
    if (s.scal[1] != 0) tc_flush<QT>(a, s, q0, split);  // the same decision in every thread
    if (tid == 0) s.scal[0] = 0;  // read by nobody until the next tile's barrier
  }
  tc_flush<QT>(a, s, q0, split);
  // The split's k best of each query as (distance, row); (+inf, -1) past the eligible ones, and
  // everywhere for a query that never accepted a row.
  for (int e = tid; e < nq * a.k; e += kTcThreads) {
    const int q = e / a.k, j = e % a.k;
    const uint64_t key = s.flushed[q] ? a.lists[((q0 + q) * a.splits + split) * a.kpad + j] : kNoKey;
    const int64_t o = ((q0 + q) * a.splits + split) * a.k + j;
    a.out_d[o] = key_dist(key);
    a.out_i[o] = key == kNoKey ? int64_t(-1) : a.rows[p0 + int64_t(key & 0xffffffffu)];
  }
}

// =============================================================================================
// Host side: plans, workspace, launches.

size_t acc_size(DType dt) { return dt == DType::kFloat64 ? sizeof(double) : sizeof(float); }

size_t partial_smem(DType dt, int qb, int kpad) {
  const int td = dt == DType::kFloat64 ? tile_dims<double>() : tile_dims<float>();
  return select_layout(qb, kpad, buffer_cap(kpad), acc_size(dt), sizeof(int32_t), td).total;
}

// Kernels that need more than the default 48 KiB of dynamic shared memory must opt in.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Geometry of a tensor-core configuration for one problem.
struct TcGeometry {
  int kpad, w, sw, kchunks;
};

TcGeometry tc_geometry(DType dt, int64_t D, int k, int bt) {
  TcGeometry g;
  g.kpad = next_pow2(k);
  g.w = std::max(g.kpad, 2 * bt);
  const int64_t esize = dt == DType::kFloat32 ? 4 : 2;
  // Row words up to a multiple of 16 (the MMA loop's chunk), plus 4: a stride of 4 mod 16 words
  // puts the 8 rows of an ldmatrix matrix in distinct 16-byte bank groups.
  const int64_t words = ceil_div(D * esize, 64) * 16;
  g.kchunks = int(words / 16);
  g.sw = int(words + 4);
  return g;
}

// Byte offsets of the workspace regions (256-byte aligned); `total` is the size.
struct Workspace {
  size_t part_d, part_i;                  // [B, splits, k] partial lists (when splits > 1)
  size_t tmp_d, tmp_i;                    // a level of the merge tree
  size_t lists, bufs;                     // tensor cores: keys of the lists and buffers
  size_t h_all, offsets, rows, rows_h;    // tensor cores: row statistics and compaction
  size_t total;
};

Workspace workspace_layout(const TopkPlan& p) {
  Workspace w{};
  const size_t acc = acc_size(p.dt);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t o = off;
    off = align256(off + bytes);
    return o;
  };
  const int64_t lists = p.B * p.splits;
  const int64_t level1 = ceil_div(p.splits, kMergeFanIn);  // lists per query after one merge level
  if (p.splits > 1) {
    w.part_d = take(size_t(lists) * p.k * acc);
    w.part_i = take(size_t(lists) * p.k * sizeof(int64_t));
  }
  if (level1 > 1) {
    w.tmp_d = take(size_t(p.B) * level1 * p.k * acc);
    w.tmp_i = take(size_t(p.B) * level1 * p.k * sizeof(int64_t));
  }
  if (p.tensor_cores) {
    const TcGeometry g = tc_geometry(p.dt, p.D, p.k, p.tile_rows);
    const int64_t chunks = ceil_div(p.N, kRowChunk);
    w.lists = take(size_t(lists) * g.kpad * sizeof(uint64_t));
    w.bufs = take(size_t(lists) * g.w * sizeof(uint64_t));
    w.h_all = take(size_t(p.N) * sizeof(float));
    w.offsets = take(size_t(chunks + 1) * sizeof(int64_t));
    w.rows = take(size_t(p.N) * sizeof(int64_t));
    w.rows_h = take(size_t(p.N) * sizeof(float));
  }
  w.total = off;
  return w;
}

template <typename scalar_t, int QT, int BT>
cudaError_t tc_kernel_attributes(size_t smem, int* blocks_per_sm, bool* built) {
  auto kernel = tc_partial_kernel<scalar_t, QT, BT>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  // The kernel works only when compiled for sm_80 or later (PTX or SASS); a binary that reaches
  // this GPU through older PTX has a kernel that traps, and must take the SIMT path.
  *built = attr.ptxVersion >= 80;
  if (!*built) return cudaSuccess;
  err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kernel, kTcThreads, smem);
}

template <int QT, int BT>
cudaError_t tc_attributes(DType dt, size_t smem, int* blocks_per_sm, bool* built) {
  switch (dt) {
    case DType::kFloat32:
      return tc_kernel_attributes<float, QT, BT>(smem, blocks_per_sm, built);
    case DType::kFloat16:
      return tc_kernel_attributes<__half, QT, BT>(smem, blocks_per_sm, built);
    case DType::kBFloat16:
      return tc_kernel_attributes<__nv_bfloat16, QT, BT>(smem, blocks_per_sm, built);
    default:
      *built = false;
      return cudaSuccess;
  }
}

// The tensor-core plan, or p->tensor_cores = false when the problem or the GPU does not take it.
cudaError_t plan_tensor_cores(int sms, int cc_major, size_t optin, TopkPlan* p) {
  p->tensor_cores = false;
  if (p->dt == DType::kFloat64 || cc_major < 8 || p->B < kTcMinB || p->D < 1) return cudaSuccess;
  // An unbounded band (D in the millions) would make h_b NaN, which marks a row ineligible.
  const Band band = make_band(p->dt, p->D);
  if (!(std::isfinite(band.opa) && std::isfinite(band.bm1) && std::isfinite(band.omb) && std::isfinite(band.eta) &&
        std::isfinite(band.abs)))
    return cudaSuccess;
  // Tile shapes, most queries first: 128 x 64 when the batch fills it, else 64 x 32.
  const int shapes[2][2] = {{128, 64}, {64, 32}};
  for (const auto& shape : shapes) {
    const int qt = shape[0], bt = shape[1];
    if (qt == 128 && p->B <= 64) continue;
    const TcGeometry g = tc_geometry(p->dt, p->D, p->k, bt);
    const size_t fixed = tc_layout(qt, bt, g.sw, g.kpad, g.w, 0).total;
    const size_t group_bytes = size_t(g.kpad + g.w) * sizeof(uint64_t);
    if (fixed + group_bytes + 16 > optin) continue;
    const size_t scratch = std::min(optin - fixed - 16, std::max(kMaxFlushScratch, group_bytes));  // 16: alignment
    const int groups = int(std::min<size_t>(qt, scratch / group_bytes));
    const size_t smem = tc_layout(qt, bt, g.sw, g.kpad, g.w, groups).total;
    if (smem > optin) continue;
    int blocks_per_sm = 0;
    bool built = false;
    cudaError_t err = qt == 128 ? tc_attributes<128, 64>(p->dt, smem, &blocks_per_sm, &built)
                                : tc_attributes<64, 32>(p->dt, smem, &blocks_per_sm, &built);
    if (err != cudaSuccess) return err;
    if (!built) return cudaSuccess;
    if (blocks_per_sm < 1) continue;
    // Splits: each at least 4 lists' worth of rows (every split adds about k log(rows / k)
    // acceptances per query), lists and buffers within kMaxTcEntries; among those, the fewest
    // that fill the GPU's waves well: the time goes as ceil(blocks / resident blocks) / splits,
    // and a split count is taken only when it beats the smaller ones by 10%.
    const int64_t qtiles = ceil_div(p->B, qt);
    const int64_t resident = int64_t(sms) * blocks_per_sm;
    int64_t cap = std::max<int64_t>(1, p->N / (4 * std::max(g.kpad, bt)));
    cap = std::min(cap, std::max<int64_t>(1, kMaxTcEntries / (p->B * (g.kpad + g.w))));
    cap = std::min(cap, 4 * ceil_div(resident, qtiles));
    int64_t splits = 1;
    double best = double(ceil_div(qtiles, resident));
    for (int64_t sp = 2; sp <= cap; ++sp) {
      const double cost = double(ceil_div(qtiles * sp, resident)) / double(sp);
      if (cost < 0.9 * best) {
        best = cost;
        splits = sp;
      }
    }
    // Keys hold a row's offset within its split in 32 bits.
    splits = std::max(splits, ceil_div(p->N, int64_t(1) << 31));
    if (qtiles * splits > 0x7fffffff || ceil_div(p->N, kRowChunk) > 0x7fffffff) continue;
    p->tensor_cores = true;
    p->queries_per_block = qt;
    p->tile_rows = bt;
    p->flush_groups = groups;
    p->splits = splits;
    p->split_rows = 0;
    p->smem_bytes = smem;
    return cudaSuccess;
  }
  return cudaSuccess;
}

template <typename scalar_t, int QB>
cudaError_t launch_partial(const TopkPlan& p, const TopkArgs& a, const void* queries,
                           const void* bank, const bool* mask, const int64_t* excl, void* out_d,
                           int64_t* out_i, cudaStream_t stream) {
  using acc_t = acc_type_t<scalar_t>;
  auto kernel = topk_partial_kernel<scalar_t, QB>;
  cudaError_t err = allow_smem(kernel, p.smem_bytes);
  if (err != cudaSuccess) return err;
  const int64_t groups = (p.B + QB - 1) / QB;
  kernel<<<static_cast<unsigned int>(groups * p.splits), kThreads, p.smem_bytes, stream>>>(
      a, static_cast<const scalar_t*>(queries), static_cast<const scalar_t*>(bank), mask, excl,
      static_cast<acc_t*>(out_d), out_i);
  return cudaGetLastError();
}

// Levels of the merge tree from the [B, splits, k] partial lists in part (splits > 1) to the
// outputs; intermediate levels alternate between tmp and part (a level never needs more room
// than the one before it).
template <typename acc_t>
cudaError_t merge_tree(const TopkPlan& p, acc_t* part_d, int64_t* part_i, acc_t* tmp_d, int64_t* tmp_i,
                       acc_t* out_d, int64_t* out_i, cudaStream_t stream) {
  MergeArgs m;
  m.k = p.k;
  m.kpad = next_pow2(p.k);
  m.s_in = p.splits;
  const acc_t* src_d = part_d;
  const int64_t* src_i = part_i;
  bool from_part = true;
  const size_t smem = merge_smem(sizeof(acc_t), m.kpad);
  while (m.s_in > 1) {
    m.s_out = ceil_div(m.s_in, kMergeFanIn);
    acc_t* dst_d = m.s_out == 1 ? out_d : (from_part ? tmp_d : part_d);
    int64_t* dst_i = m.s_out == 1 ? out_i : (from_part ? tmp_i : part_i);
    topk_merge_kernel<acc_t><<<static_cast<unsigned int>(p.B * m.s_out), kThreads, smem, stream>>>(
        m, src_d, src_i, dst_d, dst_i);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    src_d = dst_d;
    src_i = dst_i;
    from_part = !from_part;
    m.s_in = m.s_out;
  }
  return cudaSuccess;
}

template <typename scalar_t, int QT, int BT>
cudaError_t launch_tc(const TopkPlan& p, const TcArgs& a, const scalar_t* queries, const scalar_t* bank,
                      const int64_t* excl, cudaStream_t stream) {
  auto kernel = tc_partial_kernel<scalar_t, QT, BT>;
  cudaError_t err = allow_smem(kernel, p.smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned int>(a.qtiles * a.splits), kTcThreads, p.smem_bytes, stream>>>(a, queries, bank,
                                                                                              excl);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t run_tensor_cores(const TopkPlan& p, const Workspace& ws, unsigned char* base, const scalar_t* queries,
                             const scalar_t* bank, const bool* mask, const int64_t* excl, float* dists,
                             int64_t* indices, cudaStream_t stream) {
  const Band band = make_band(p.dt, p.D);
  const int64_t chunks = ceil_div(p.N, kRowChunk);
  float* h_all = reinterpret_cast<float*>(base + ws.h_all);
  int64_t* offsets = reinterpret_cast<int64_t*>(base + ws.offsets);
  TcArgs a;
  a.B = p.B;
  a.N = p.N;
  a.D = p.D;
  const TcGeometry g = tc_geometry(p.dt, p.D, p.k, p.tile_rows);
  a.k = p.k;
  a.kpad = g.kpad;
  a.w = g.w;
  a.sw = g.sw;
  a.kchunks = g.kchunks;
  a.groups = p.flush_groups;
  a.vec = (p.D * int64_t(sizeof(scalar_t))) % 16 == 0 && reinterpret_cast<uintptr_t>(queries) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(bank) % 16 == 0;
  a.splits = p.splits;
  a.qtiles = ceil_div(p.B, p.queries_per_block);
  a.band = band;
  a.eligible = offsets + chunks;
  a.rows = reinterpret_cast<const int64_t*>(base + ws.rows);
  a.rows_h = reinterpret_cast<const float*>(base + ws.rows_h);
  a.lists = reinterpret_cast<uint64_t*>(base + ws.lists);
  a.bufs = reinterpret_cast<uint64_t*>(base + ws.bufs);
  float* part_d = reinterpret_cast<float*>(base + ws.part_d);
  int64_t* part_i = reinterpret_cast<int64_t*>(base + ws.part_i);
  a.out_d = p.splits > 1 ? part_d : dists;
  a.out_i = p.splits > 1 ? part_i : indices;

  tc_row_stats_kernel<scalar_t><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
      p.N, p.D, bank, mask, band, h_all, offsets);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  tc_scan_kernel<<<1, kThreads, 0, stream>>>(chunks, offsets);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  tc_compact_kernel<<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
      p.N, h_all, offsets, reinterpret_cast<int64_t*>(base + ws.rows), reinterpret_cast<float*>(base + ws.rows_h));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = p.queries_per_block == 128 ? launch_tc<scalar_t, 128, 64>(p, a, queries, bank, excl, stream)
                                   : launch_tc<scalar_t, 64, 32>(p, a, queries, bank, excl, stream);
  if (err != cudaSuccess || p.splits == 1) return err;
  return merge_tree<float>(p, part_d, part_i, reinterpret_cast<float*>(base + ws.tmp_d),
                           reinterpret_cast<int64_t*>(base + ws.tmp_i), dists, indices, stream);
}

}  // namespace

cudaError_t masked_topk_plan(DType dt, int64_t B, int64_t N, int64_t D, int k, TopkPlan* plan) {
  if (B < 0 || N < 1 || D < 0 || k < 1 || k > N) return cudaErrorInvalidValue;
  int dev = 0, sms = 0, optin = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;

  TopkPlan p;
  p.B = B;
  p.N = N;
  p.D = D;
  p.k = k;
  p.dt = dt;
  const int kpad = next_pow2(k);
  if (B > 0x7fffffff) return cudaErrorInvalidValue;
  err = plan_tensor_cores(sms, major, size_t(optin), &p);
  if (err != cudaSuccess) return err;
  if (!p.tensor_cores) {
    // SIMT: the most queries per block (more reuse of each staged tile) whose shared memory leaves
    // room for two blocks per SM on large GPUs; one query per block may use everything.
    const size_t budget = std::min<size_t>(size_t(optin), 96 * 1024);
    p.queries_per_block = 1;
    for (int qb = kMaxQB; qb > 1; qb /= 2) {
      if (partial_smem(dt, qb, kpad) <= budget && qb / 2 < B) {
        p.queries_per_block = qb;
        break;
      }
    }
    p.smem_bytes = partial_smem(dt, p.queries_per_block, kpad);
    if (p.smem_bytes > size_t(optin)) return cudaErrorInvalidValue;
    // Splits: enough blocks to fill the GPU several times over, at least two tiles per split,
    // partial lists within kMaxPartialEntries, and row offsets within a split that fit int32.
    const int64_t groups = (B + p.queries_per_block - 1) / p.queries_per_block;
    const int64_t tiles = (N + kTile - 1) / kTile;
    int64_t splits = (int64_t(sms) * 8 + std::max<int64_t>(groups, 1) - 1) / std::max<int64_t>(groups, 1);
    splits = std::min(splits, std::max<int64_t>(1, tiles / 2));
    splits = std::min(splits, std::max<int64_t>(1, kMaxPartialEntries / std::max<int64_t>(1, B * k)));
    splits = std::max(splits, (N + (int64_t(1) << 30) - 1) >> 30);
    const int64_t tiles_per_split = (tiles + splits - 1) / splits;
    p.split_rows = tiles_per_split * kTile;
    p.splits = (N + p.split_rows - 1) / p.split_rows;
    if (groups * p.splits > 0x7fffffff) return cudaErrorInvalidValue;
  }
  if (B * std::max<int64_t>(1, ceil_div(p.splits, kMergeFanIn)) > 0x7fffffff) return cudaErrorInvalidValue;
  p.workspace_bytes = workspace_layout(p).total;
  *plan = p;
  return cudaSuccess;
}

cudaError_t masked_topk(const TopkPlan& p, const void* queries, const void* bank,
                        const bool* exclude_mask, const int64_t* exclude_index, void* dists,
                        int64_t* indices, void* workspace, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  if (p.workspace_bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  const Workspace ws = workspace_layout(p);
  unsigned char* base = static_cast<unsigned char*>(workspace);
  return dispatch_dtype(p.dt, [&](auto tag) -> cudaError_t {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type_t<scalar_t>;
    if constexpr (!std::is_same<scalar_t, double>::value) {
      if (p.tensor_cores)
        return run_tensor_cores<scalar_t>(p, ws, base, static_cast<const scalar_t*>(queries),
                                          static_cast<const scalar_t*>(bank), exclude_mask, exclude_index,
                                          static_cast<float*>(dists), indices, stream);
    }
    TopkArgs a;
    a.B = p.B;
    a.N = p.N;
    a.D = p.D;
    a.k = p.k;
    a.kpad = next_pow2(p.k);
    a.cap = buffer_cap(a.kpad);
    a.split_rows = p.split_rows;
    a.splits = p.splits;
    acc_t* part_d = reinterpret_cast<acc_t*>(base + ws.part_d);
    int64_t* part_i = reinterpret_cast<int64_t*>(base + ws.part_i);
    void* pd = p.splits > 1 ? static_cast<void*>(part_d) : dists;
    int64_t* pi = p.splits > 1 ? part_i : indices;
    cudaError_t err;
    switch (p.queries_per_block) {
      case 8:
        err = launch_partial<scalar_t, 8>(p, a, queries, bank, exclude_mask, exclude_index, pd, pi, stream);
        break;
      case 4:
        err = launch_partial<scalar_t, 4>(p, a, queries, bank, exclude_mask, exclude_index, pd, pi, stream);
        break;
      case 2:
        err = launch_partial<scalar_t, 2>(p, a, queries, bank, exclude_mask, exclude_index, pd, pi, stream);
        break;
      default:
        err = launch_partial<scalar_t, 1>(p, a, queries, bank, exclude_mask, exclude_index, pd, pi, stream);
    }
    if (err != cudaSuccess || p.splits == 1) return err;
    return merge_tree<acc_t>(p, part_d, part_i, reinterpret_cast<acc_t*>(base + ws.tmp_d),
                             reinterpret_cast<int64_t*>(base + ws.tmp_i), static_cast<acc_t*>(dists), indices,
                             stream);
  });
}

}  // namespace cuda
}  // namespace acn
