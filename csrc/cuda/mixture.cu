// CUDA kernels of the mixture log-likelihood (forward, backward) and the ACN KL on top of it,
// with the unit posterior N(code, I) or a diagonal one (its log-scale pls).
// The per-element formulas are those of include/acn_math.h, shared with the CPU kernel
// (csrc/cpu/mixture.cpp, the spec in code); only the work split differs:
//   forward:  a group of W lanes (W = D rounded up to a power of two, at most 32) per row b; each
//             lane takes dimensions d = lane, lane + W, ... and makes three passes over the M
//             components of each (the logits' maximum, the joint terms' maximum, their sum of
//             exp(t - max)); the row sum over D (when
//             per_dim is false) is a shuffle reduction inside the group, so it is deterministic
//             and needs no atomics or second kernel;
//   backward: one thread per element (b, d), two passes over m (the logits' maximum, then the
//             gradients).
#include <cuda_runtime.h>

#include "acn_math.h"
#include "device_utils.cuh"
#include "launchers.h"

namespace acn {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mixture_fwd_kernel(int64_t B, int64_t D, int64_t M, int W, const scalar_t* __restrict__ z,
                       const scalar_t* __restrict__ lg, const scalar_t* __restrict__ mu,
                       const scalar_t* __restrict__ ls, const scalar_t* __restrict__ code,
                       const scalar_t* __restrict__ pls, bool per_dim,
                       acc_type_t<scalar_t>* __restrict__ out,
                       acc_type_t<scalar_t>* __restrict__ lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t total = B * W;
  const int lane = threadIdx.x % W;  // W divides 32 and blockDim is a multiple of 32
  // The loop bound depends on the block only, so every lane of a warp reaches the shuffles.
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < total;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = (base + threadIdx.x) / W;
    acc_t row = 0;
    if (b < B) {
      for (int64_t d = lane; d < D; d += W) {
        const int64_t e = b * D + d;
        const int64_t p = e * M;
        const acc_t zz = to_acc(z[e]);
        // Three passes over m (acn_math.h): the logits' maximum, which shifts every joint term;
        // the joint terms' maximum, with the logits' sum; the joint terms' sum.
        acc_t mxl = -inf_v<acc_t>();
        for (int64_t m = 0; m < M; ++m) mxl = max_of(mxl, to_acc(lg[p + m]));
        const acc_t shl = lse_shift(mxl);
        acc_t mxt = -inf_v<acc_t>(), sl = 0;
        for (int64_t m = 0; m < M; ++m) {
          const acc_t logit = to_acc(lg[p + m]);
          const acc_t log_s = to_acc(ls[p + m]);
          mxt = max_of(mxt, joint_term(zz, logit, shl, to_acc(mu[p + m]), log_s, acn_exp(-log_s)));
          sl += weight_term(logit, shl);
        }
        const acc_t sht = lse_shift(mxt);
        acc_t st = 0;
        for (int64_t m = 0; m < M; ++m) {
          // Recomputing t costs one exp; keeping M terms per thread would cost registers for
          // a runtime M, and the parameters are in L1 from the first passes.
          const acc_t log_s = to_acc(ls[p + m]);
          const acc_t t = joint_term(zz, to_acc(lg[p + m]), shl, to_acc(mu[p + m]), log_s,
                                     acn_exp(-log_s));
          st += acn_exp(t - sht);
        }
        const acc_t big_t = lse_finish(sht, st);
        const acc_t lz = lse_finish(acc_t(0), sl);  // the shifted logits' maximum is 0
        lse[2 * e] = big_t;
        lse[2 * e + 1] = lz;
        acc_t v = big_t - lz;
        if (code) {
          // The unit posterior with literal (0, 1): the same operations as before pls existed.
          const acc_t c = to_acc(code[e]);
          const acc_t lsq = pls ? to_acc(pls[e]) : acc_t(0);
          v = (pls ? gaussian_log_prob(zz, c, lsq, acn_exp(-lsq))
                   : gaussian_log_prob(zz, c, acc_t(0), acc_t(1))) - v;
        }
        if (per_dim)
          out[e] = v;
        else
          row += v;
      }
    }
    if (!per_dim) {
      for (int off = W / 2; off > 0; off >>= 1) row += __shfl_xor_sync(0xffffffffu, row, off, W);
      if (b < B && lane == 0) out[b] = row;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mixture_bwd_kernel(int64_t B, int64_t D, int64_t M, const acc_type_t<scalar_t>* __restrict__ grad,
                       const scalar_t* __restrict__ z, const scalar_t* __restrict__ lg,
                       const scalar_t* __restrict__ mu, const scalar_t* __restrict__ ls,
                       const scalar_t* __restrict__ code, const scalar_t* __restrict__ pls,
                       const acc_type_t<scalar_t>* __restrict__ lse, bool per_dim,
                       scalar_t* __restrict__ dz, scalar_t* __restrict__ dlg,
                       scalar_t* __restrict__ dmu, scalar_t* __restrict__ dls,
                       scalar_t* __restrict__ dcode, scalar_t* __restrict__ dpls) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t n = B * D;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = e * M;
    const acc_t zz = to_acc(z[e]);
    const acc_t go = per_dim ? grad[e] : grad[e / D];
    const acc_t g = code ? -go : go;  // KL = log q(z) - log p
    const acc_t big_t = lse[2 * e], lz = lse[2 * e + 1];
    acc_t mxl = -inf_v<acc_t>();  // the logits' shift, as in the forward
    for (int64_t m = 0; m < M; ++m) mxl = max_of(mxl, to_acc(lg[p + m]));
    const acc_t shl = lse_shift(mxl);
    acc_t gz = 0;
    for (int64_t m = 0; m < M; ++m) {
      acc_t dl, dm, ds;
      gz += component_grads(g, zz, to_acc(lg[p + m]), shl, to_acc(mu[p + m]), to_acc(ls[p + m]),
                            big_t, lz, &dl, &dm, &ds);
      dlg[p + m] = from_acc<scalar_t>(dl);
      dmu[p + m] = from_acc<scalar_t>(dm);
      dls[p + m] = from_acc<scalar_t>(ds);
    }
    if (code) {
      // The posterior's gradients in the same pass; pls is uniform over the grid (no divergence),
      // and the literal inv_s = 1 keeps the unit posterior's operations as before pls existed.
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

// Lanes per row in the forward kernel: D rounded up to a power of two, capped at a warp.
int lanes_per_row(int64_t D) {
  int w = 1;
  while (w < 32 && w < D) w <<= 1;
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
    const int W = lanes_per_row(D);
    mixture_fwd_kernel<scalar_t><<<grid_for(B * W, kThreads), kThreads, 0, stream>>>(
        B, D, M, W, static_cast<const scalar_t*>(z), static_cast<const scalar_t*>(logits),
        static_cast<const scalar_t*>(means), static_cast<const scalar_t*>(log_scales),
        static_cast<const scalar_t*>(code), static_cast<const scalar_t*>(pls), per_dim,
        static_cast<acc_t*>(out),
        static_cast<acc_t*>(lse));
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
    mixture_bwd_kernel<scalar_t><<<grid_for(B * D, kThreads), kThreads, 0, stream>>>(
        B, D, M, static_cast<const acc_t*>(grad), static_cast<const scalar_t*>(z),
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
