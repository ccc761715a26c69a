// CUDA kernels of the masked top-k neighbour search (contract: docs/design.md, "masked_topk"), FAISS-like:
//
// partial kernel: one block per (group of QB queries, split of bank rows). The block walks its
//   split in tiles of kTile rows (one row per thread). Each tile is staged in shared memory in
//   chunks of TD dimensions (converted to the accumulation type: fp16/bf16 inputs are computed
//   in fp32, never TF32), and each thread accumulates the exact squared differences of its row
//   against the QB queries in registers. A candidate is then compared with its query's current
//   k-th best — one comparison rejects nearly all of them once the list has filled — and the
//   few survivors are appended to a per-query buffer in shared memory. When a buffer could
//   overflow in the next round it is bitonic-sorted and merged into the sorted list (the
//   elementwise minimum of the ascending list and the reversed buffer is a bitonic sequence
//   holding the smallest entries of both; a bitonic merge sorts it). The same code serves every
//   k up to MAX_K: only the list length Kpad (k rounded up to a power of two) changes.
// merge kernel: one block per query runs the same selection over the `splits` partial lists.
//
// Distances use the difference form sum_d (q_d - b_d)^2 rather than |q|^2 + |b|^2 - 2 q.b: it
// costs one subtraction more per element but has no cancellation, so near neighbours and ties
// come out in the same order as in the float64 reference. Memory: O(B * k * splits) for the
// partial lists (splits is capped) plus shared memory; never B x N. All offsets are 64-bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "acn_math.h"
#include "device_utils.cuh"
#include "launchers.h"
#include "masked_topk.h"

namespace acn {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads per block
constexpr int kTile = kThreads;  // bank rows per tile: one per thread
constexpr int kMaxQB = 8;  // queries per block at most (one warp each when scanning them)
// Cap on the partial lists, in entries (splits * B * k), to bound the workspace memory.
constexpr int64_t kMaxPartialEntries = int64_t(1) << 24;

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

// Two blocks per SM: lets ptxas use up to 128 registers (QB accumulators, the staged chunk of the
// thread's row, the exclusions) without spilling.
template <typename scalar_t, int QB>
__global__ void __launch_bounds__(kThreads, 2)
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

  // With one split this is the answer; otherwise the [B, splits, k] partial lists.
  for (int e = tid; e < QB * a.k; e += kThreads) {
    const int q = e / a.k, j = e % a.k;
    if (q0 + q >= a.B) continue;
    const int32_t li = sel.list_i[q * a.kpad + j];
    const int64_t o = ((q0 + q) * a.splits + split) * a.k + j;
    out_d[o] = sel.list_d[q * a.kpad + j];
    out_i[o] = li < 0 ? int64_t(-1) : row_begin + li;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    topk_merge_kernel(TopkArgs a, const acc_t* __restrict__ part_d,
                      const int64_t* __restrict__ part_i, acc_t* __restrict__ out_d,
                      int64_t* __restrict__ out_i) {
  extern __shared__ __align__(16) unsigned char smem[];
  const SelectLayout l = select_layout(1, a.kpad, a.cap, sizeof(acc_t), sizeof(int64_t), 0);
  BlockSelect<acc_t, int64_t, 1> sel(smem, l, a.k, a.kpad, a.cap);
  const int64_t b = blockIdx.x;
  const int64_t n = a.splits * a.k;
  const acc_t* pd = part_d + b * n;
  const int64_t* pi = part_i + b * n;
  sel.init();
  __syncthreads();
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t e = base + threadIdx.x;
    if (e < n && pi[e] >= 0) sel.offer(0, pd[e], pi[e]);
    sel.end_round(false);
  }
  sel.end_round(true);
  for (int j = threadIdx.x; j < a.k; j += kThreads) {
    out_d[b * a.k + j] = sel.list_d[j];
    out_i[b * a.k + j] = sel.list_i[j];
  }
}

size_t acc_size(DType dt) { return dt == DType::kFloat64 ? sizeof(double) : sizeof(float); }

size_t partial_smem(DType dt, int qb, int kpad) {
  const int td = dt == DType::kFloat64 ? tile_dims<double>() : tile_dims<float>();
  return select_layout(qb, kpad, buffer_cap(kpad), acc_size(dt), sizeof(int32_t), td).total;
}

size_t merge_smem(DType dt, int kpad) {
  return select_layout(1, kpad, buffer_cap(kpad), acc_size(dt), sizeof(int64_t), 0).total;
}

// Kernels that need more than the default 48 KiB of dynamic shared memory must opt in.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
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

}  // namespace

cudaError_t masked_topk_plan(DType dt, int64_t B, int64_t N, int64_t D, int k, TopkPlan* plan) {
  if (B < 0 || N < 1 || D < 0 || k < 1 || k > N) return cudaErrorInvalidValue;
  int dev = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;

  TopkPlan p;
  p.B = B;
  p.N = N;
  p.D = D;
  p.k = k;
  p.dt = dt;
  const int kpad = next_pow2(k);
  // The most queries per block (more reuse of each staged tile) whose shared memory leaves room
  // for two blocks per SM on large GPUs; one query per block may use everything.
  const size_t budget = std::min<size_t>(size_t(optin), 96 * 1024);
  p.queries_per_block = 1;
  for (int qb = kMaxQB; qb > 1; qb /= 2) {
    if (partial_smem(dt, qb, kpad) <= budget && qb / 2 < B) {
      p.queries_per_block = qb;
      break;
    }
  }
  p.smem_bytes = partial_smem(dt, p.queries_per_block, kpad);
  if (p.smem_bytes > size_t(optin) || merge_smem(dt, kpad) > 48 * 1024) return cudaErrorInvalidValue;

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
  if (groups * p.splits > 0x7fffffff || B > 0x7fffffff) return cudaErrorInvalidValue;
  *plan = p;
  return cudaSuccess;
}

cudaError_t masked_topk(const TopkPlan& p, const void* queries, const void* bank,
                        const bool* exclude_mask, const int64_t* exclude_index, void* dists,
                        int64_t* indices, void* part_dists, int64_t* part_indices,
                        cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  if (p.splits > 1 && (part_dists == nullptr || part_indices == nullptr)) return cudaErrorInvalidValue;
  TopkArgs a;
  a.B = p.B;
  a.N = p.N;
  a.D = p.D;
  a.k = p.k;
  a.kpad = next_pow2(p.k);
  a.cap = buffer_cap(a.kpad);
  a.split_rows = p.split_rows;
  a.splits = p.splits;
  void* pd = p.splits > 1 ? part_dists : dists;
  int64_t* pi = p.splits > 1 ? part_indices : indices;
  return dispatch_dtype(p.dt, [&](auto tag) -> cudaError_t {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type_t<scalar_t>;
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
    topk_merge_kernel<acc_t><<<static_cast<unsigned int>(p.B), kThreads, merge_smem(p.dt, a.kpad), stream>>>(
        a, static_cast<const acc_t*>(part_dists), part_indices, static_cast<acc_t*>(dists), indices);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace acn
