// CUDA kernels of the mixture log-likelihood (forward, backward) and the ACN KL on top of it,
// with the unit posterior N(code, I) or a diagonal one (its log-scale pls).
// The per-element formulas are those of include/acn_math.h, shared with the CPU kernel
// (csrc/cpu/mixture.cpp, the spec in code); only the work split differs. The parameters are
// [B, D, M] with m fastest, so both kernels give each element (b, d) a group of P lanes
// (P = M rounded up to a power of two, at most a warp) and lane j of a group the components
// j, j + P, ...: a warp's 32 / P groups take consecutive elements, and its loads and stores of
// logits, means, log-scales and their gradients cover one contiguous run of memory (one lane per
// element looping over m would read with a stride of M: 32 sectors per load at M = 8).
// Reductions over m (maxima, sums) are butterfly shuffles inside a group; each lane then holds
// the element's values.
//   forward:  a warp per row b, its groups walking d = g, g + 32 / P, ...; three passes over each
//             lane's components (the logits' maximum, the joint terms' maximum with the logits'
//             sum, the joint terms' sum of exp(t - max)); the row sum over D (when per_dim is
//             false) is kept by each group's first lane and reduced over the warp in a fixed
//             order, so it is deterministic and needs no atomics or second kernel;
//   backward: a warp per 32 / P consecutive elements, two passes over each lane's components
//             (the logits' maximum, then the gradients), z's gradient summed over the group.
#include <cuda_runtime.h>

#include "acn_math.h"
#include "device_utils.cuh"
#include "launchers.h"

namespace acn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// At least two blocks per SM: with no minimum, ptxas aimed at full occupancy and spilled the
// float64 forward to fit 64 registers (-Xptxas -v for sm_90).
constexpr int kMinBlocks = 2;
constexpr unsigned kFullWarp = 0xffffffffu;

// Maximum and sum over the `width` lanes of a group (width a power of two dividing 32). Every
// lane of the warp must call them: the callers keep their loop bounds uniform per warp.
template <typename T>
__device__ T group_max(T v, int width) {
  for (int off = width / 2; off > 0; off >>= 1) v = max_of(v, __shfl_xor_sync(kFullWarp, v, off, width));
  return v;
}

template <typename T>
__device__ T group_sum(T v, int width) {
  for (int off = width / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullWarp, v, off, width);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    mixture_fwd_kernel(int64_t B, int64_t D, int64_t M, int P, const scalar_t* __restrict__ z,
                       const scalar_t* __restrict__ lg, const scalar_t* __restrict__ mu,
                       const scalar_t* __restrict__ ls, const scalar_t* __restrict__ code,
                       const scalar_t* __restrict__ pls, bool per_dim,
                       acc_type_t<scalar_t>* __restrict__ out,
                       acc_type_t<scalar_t>* __restrict__ lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int lane = threadIdx.x % 32, j = lane % P;
  const int groups = 32 / P, g = lane / P;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  // b and d0 are uniform per warp, so every lane reaches the shuffles.
  for (int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; b < B; b += warps) {
    acc_t row = 0;
    for (int64_t d0 = 0; d0 < D; d0 += groups) {
      const bool on = d0 + g < D;
      const int64_t e = b * D + (on ? d0 + g : d0);  // an idle group repeats a real element, unwritten
      const scalar_t* __restrict__ lg_e = lg + e * M;  // the element's M components
      const scalar_t* __restrict__ mu_e = mu + e * M;
      const scalar_t* __restrict__ ls_e = ls + e * M;
      const acc_t zz = to_acc(z[e]);
      // Three passes over m (acn_math.h): the logits' maximum, which shifts every joint term;
      // the joint terms' maximum, with the logits' sum; the joint terms' sum.
      acc_t mxl = -inf_v<acc_t>();
      for (int64_t m = j; m < M; m += P) mxl = max_of(mxl, to_acc(lg_e[m]));
      const acc_t shl = lse_shift(group_max(mxl, P));
      acc_t mxt = -inf_v<acc_t>(), sl = 0;
      for (int64_t m = j; m < M; m += P) {
        const acc_t logit = to_acc(lg_e[m]);
        const acc_t log_s = to_acc(ls_e[m]);
        mxt = max_of(mxt, joint_term(zz, logit, shl, to_acc(mu_e[m]), log_s, acn_exp(-log_s)));
        sl += weight_term(logit, shl);
      }
      const acc_t sht = lse_shift(group_max(mxt, P));
      acc_t st = 0;
      for (int64_t m = j; m < M; m += P) {
        // Recomputing t costs one exp; the parameters are in L1 from the first passes (and in
        // registers when M <= 32: one component per lane).
        const acc_t log_s = to_acc(ls_e[m]);
        st += acn_exp(joint_term(zz, to_acc(lg_e[m]), shl, to_acc(mu_e[m]), log_s, acn_exp(-log_s)) - sht);
      }
      const acc_t big_t = lse_finish(sht, group_sum(st, P));
      const acc_t lz = lse_finish(acc_t(0), group_sum(sl, P));  // the shifted logits' maximum is 0
      acc_t v = big_t - lz;
      if (code) {
        // The unit posterior with literal (0, 1): the same operations as before pls existed.
        const acc_t c = to_acc(code[e]);
        const acc_t lsq = pls ? to_acc(pls[e]) : acc_t(0);
        v = (pls ? gaussian_log_prob(zz, c, lsq, acn_exp(-lsq))
                 : gaussian_log_prob(zz, c, acc_t(0), acc_t(1))) - v;
      }
      if (on && j == 0) {
        lse[2 * e] = big_t;
        lse[2 * e + 1] = lz;
        if (per_dim)
          out[e] = v;
        else
          row += v;
      }
    }
    if (!per_dim) {
      row = group_sum(row, 32);  // only each group's first lane holds a partial sum
      if (lane == 0) out[b] = row;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    mixture_bwd_kernel(int64_t B, int64_t D, int64_t M, int P, const acc_type_t<scalar_t>* __restrict__ grad,
                       const scalar_t* __restrict__ z, const scalar_t* __restrict__ lg,
                       const scalar_t* __restrict__ mu, const scalar_t* __restrict__ ls,
                       const scalar_t* __restrict__ code, const scalar_t* __restrict__ pls,
                       const acc_type_t<scalar_t>* __restrict__ lse, bool per_dim,
                       scalar_t* __restrict__ dz, scalar_t* __restrict__ dlg,
                       scalar_t* __restrict__ dmu, scalar_t* __restrict__ dls,
                       scalar_t* __restrict__ dcode, scalar_t* __restrict__ dpls) {
  using acc_t = acc_type_t<scalar_t>;
  const int lane = threadIdx.x % 32, j = lane % P;
  const int groups = 32 / P, g = lane / P;
  const int64_t n = B * D;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  // base is uniform per warp, so every lane reaches the shuffles.
  for (int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32 * groups; base < n;
       base += warps * groups) {
    const bool on = base + g < n;
    const int64_t e = on ? base + g : base;  // an idle group repeats a real element, unwritten
    const int64_t p = e * M;
    const acc_t zz = to_acc(z[e]);
    const acc_t go = per_dim ? grad[e] : grad[e / D];
    const acc_t gs = code ? -go : go;  // KL = log q(z) - log p
    const acc_t big_t = lse[2 * e], lz = lse[2 * e + 1];
    acc_t mxl = -inf_v<acc_t>();  // the logits' shift, as in the forward
    for (int64_t m = j; m < M; m += P) mxl = max_of(mxl, to_acc(lg[p + m]));
    const acc_t shl = lse_shift(group_max(mxl, P));
    acc_t gz = 0;
    for (int64_t m = j; m < M; m += P) {
      acc_t dl, dm, ds;
      gz += component_grads(gs, zz, to_acc(lg[p + m]), shl, to_acc(mu[p + m]), to_acc(ls[p + m]),
                            big_t, lz, &dl, &dm, &ds);
      if (on) {
        dlg[p + m] = from_acc<scalar_t>(dl);
        dmu[p + m] = from_acc<scalar_t>(dm);
        dls[p + m] = from_acc<scalar_t>(ds);
      }
    }
    gz = group_sum(gz, P);
    if (on && j == 0) {
      if (code) {
        // The posterior's gradients in the same pass; pls is uniform over the grid (no
        // divergence), and the literal inv_s = 1 keeps the unit posterior's operations as before.
        const acc_t c = to_acc(code[e]);
        acc_t dc, dq;
        if (pls) {
          gz += gaussian_grads(go, zz, c, acn_exp(-to_acc(pls[e])), &dc, &dq);
          dpls[e] = from_acc<scalar_t>(dq);
        } else {
          gz += gaussian_grads(go, zz, c, acc_t(1), &dc, &dq);
        }
        dcode[e] = from_acc<scalar_t>(dc);
      }
      dz[e] = from_acc<scalar_t>(gz);
    }
  }
}

// Lanes per element: M rounded up to a power of two, capped at a warp.
int lanes_per_element(int64_t M) {
  int w = 1;
  while (w < 32 && w < M) w <<= 1;
  return w;
}

}  // namespace

cudaError_t mixture_fwd(DType dt, int64_t B, int64_t D, int64_t M, const void* z,
                        const void* logits, const void* means, const void* log_scales,
                        const void* code, const void* pls, bool per_dim, void* out, void* lse,
                        cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type_t<scalar_t>;
    // A warp per row.
    mixture_fwd_kernel<scalar_t><<<grid_for(B * 32, kThreads), kThreads, 0, stream>>>(
        B, D, M, lanes_per_element(M), static_cast<const scalar_t*>(z), static_cast<const scalar_t*>(logits),
        static_cast<const scalar_t*>(means), static_cast<const scalar_t*>(log_scales),
        static_cast<const scalar_t*>(code), static_cast<const scalar_t*>(pls), per_dim,
        static_cast<acc_t*>(out), static_cast<acc_t*>(lse));
    return cudaGetLastError();
  });
}

cudaError_t mixture_bwd(DType dt, int64_t B, int64_t D, int64_t M, const void* grad,
                        const void* z, const void* logits, const void* means,
                        const void* log_scales, const void* code, const void* pls,
                        const void* lse, bool per_dim, void* dz, void* dlogits, void* dmeans,
                        void* dlog_scales, void* dcode, void* dpls, cudaStream_t stream) {
  if (B * D <= 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type_t<scalar_t>;
    const int P = lanes_per_element(M);
    mixture_bwd_kernel<scalar_t><<<grid_for((B * D + 32 / P - 1) / (32 / P) * 32, kThreads), kThreads, 0, stream>>>(
        B, D, M, P, static_cast<const acc_t*>(grad), static_cast<const scalar_t*>(z),
        static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(means),
        static_cast<const scalar_t*>(log_scales), static_cast<const scalar_t*>(code),
        static_cast<const scalar_t*>(pls), static_cast<const acc_t*>(lse), per_dim,
        static_cast<scalar_t*>(dz), static_cast<scalar_t*>(dlogits),
        static_cast<scalar_t*>(dmeans), static_cast<scalar_t*>(dlog_scales),
        static_cast<scalar_t*>(dcode), static_cast<scalar_t*>(dpls));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace acn
