// Host/device math shared by the CPU and CUDA kernels: one source for the formulas, so the CPU
// tests exercise the arithmetic the GPU kernels run. No torch headers here (nvcc compiles it raw).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Always inlined, on the host too: a lane loop vectorises only if its exp/log calls are inlined,
// and GCC's size heuristics once left acn_exp an out-of-line scalar call in the AVX-512 forward
// (10x slower).
#if defined(__CUDACC__)
#define ACN_HD __host__ __device__ __forceinline__
#else
#define ACN_HD inline __attribute__((always_inline))
#endif

namespace acn {

template <typename T>
ACN_HD T inf_v() {
  return std::numeric_limits<T>::infinity();
}

ACN_HD float bits_to_float(int32_t i) {
  float f;
  memcpy(&f, &i, sizeof f);
  return f;
}
ACN_HD int32_t float_to_bits(float f) {
  int32_t i;
  memcpy(&i, &f, sizeof i);
  return i;
}

// exp and log. On the device the CUDA intrinsics' full-precision versions; on the host
// branch-free Cephes-style polynomials (about 1 ulp), written so that GCC vectorises the lane
// loops of the CPU kernels around them (glibc's expf/logf would keep those loops scalar).
ACN_HD float acn_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2. The scale 2^n is applied as
  // two factors so that n down to -150 (denormal results) and up to 128 stay exact.
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = xc * 1.44269504088896341f + magic;
  const int32_t n = float_to_bits(t) - float_to_bits(magic);
  const float nf = t - magic;
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n1 = n >> 1, n2 = n - n1;
  float y = p * bits_to_float((n1 + 127) << 23) * bits_to_float((n2 + 127) << 23);
  y = x < -103.9720840454f ? 0.0f : y;  // below the smallest denormal
  // A NaN x needs no select of its own: it reaches y through r and p (both comparisons false).
  return x > 88.7228391117f ? inf_v<float>() : y;
#endif
}

ACN_HD double acn_exp(double x) { return exp(x); }

// log for x == 0, x >= FLT_MIN, inf and NaN (the kernels only take logs of sums >= 1 or == 0).
ACN_HD float acn_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  const int32_t ix = float_to_bits(x);
  int32_t e = ((ix >> 23) & 0xff) - 127;
  float m = bits_to_float((ix & 0x007fffff) | 0x3f800000);  // mantissa in [1, 2)
  const bool big = m > 1.41421356237f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;  // log(1 + f) with f in [-0.29, 0.41]
  const float z = f * f;
  float y = 7.0376836292E-2f;
  y = y * f - 1.1514610310E-1f;
  y = y * f + 1.1676998740E-1f;
  y = y * f - 1.2420140846E-1f;
  y = y * f + 1.4249322787E-1f;
  y = y * f - 1.6668057665E-1f;
  y = y * f + 2.0000714765E-1f;
  y = y * f - 2.4999993993E-1f;
  y = y * f + 3.3333331174E-1f;
  y = y * f * z;
  const float ef = static_cast<float>(e);
  y = y + ef * -2.12194440e-4f - 0.5f * z;
  float r = f + y + ef * 0.693359375f;
  r = x == 0.0f ? -inf_v<float>() : r;
  r = x == inf_v<float>() ? x : r;
  return (x != x || x < 0.0f) ? std::numeric_limits<float>::quiet_NaN() : r;
#endif
}

ACN_HD double acn_log(double x) { return log(x); }

// ---------------------------------------------------------------------------------------------
// Mixture of per-dimension Gaussians. For one element (b, d) with components m:
//   s    = max_m logit_m (0 where infinite, lse_shift),   l_m = logit_m - s   (shifted logits)
//   t_m  = l_m + log N(z; mu_m, sigma_m),  sigma_m = exp(log_s_m)   (the joint term)
//   T    = logsumexp_m t_m,   Lz = logsumexp_m l_m = log sum_m exp(l_m),   log p = T - Lz.
// The shift comes first because log p is a difference of two log-sum-exps: taken over the raw
// logits, both carry the logits' magnitude and the difference cancels (float32 at logits ~1e10
// has an ulp of 1024, so lse(logit + log N) - lse(logit) came out 0). Over the shifted logits
// Lz lies in [0, log M] and T in [log p, log p + log M], so nothing cancels; l_m itself is exact
// where logit_m is within a factor 2 of s (Sterbenz) and otherwise weighs exp(l_m) ~ 0.
// The kernels take the maximum of the logits first, then (over m) the maximum of t, then sums of
// exp(x - max), which keeps every exp argument <= 0. The backward needs s, T and Lz: the forward
// saves (T, Lz), the backward takes the logits' maximum again (no exp; the saved tensor keeps
// its [B, D, 2] shape).

template <typename T>
struct Constants {
  static constexpr T half_log_2pi = T(0.918938533204672741780329736406);
};

ACN_HD float max_of(float a, float b) { return a > b ? a : b; }
ACN_HD double max_of(double a, double b) { return a > b ? a : b; }

// The shift used for a log-sum-exp: the maximum, or 0 where it is infinite (all terms -inf would
// otherwise give exp(-inf - -inf) = NaN; +inf terms then give an inf sum, the right limit).
template <typename T>
ACN_HD T lse_shift(T mx) {
  return fabs(mx) == inf_v<T>() ? T(0) : mx;  // no ||: keeps the CPU lane loops branch-free
}

// log-sum-exp from its shift and sum of exp(x - shift). sum == 0 (all terms -inf) gives -inf.
template <typename T>
ACN_HD T lse_finish(T shift, T sum) {
  return shift + acn_log(sum);
}

// The joint term t_m, given the logits' shift s (lse_shift of their maximum) and the precomputed
// inverse scale exp(-log_s) (u = (z - mu) / sigma). (z - mu) * inv_s rather than a division by
// sigma: a tiny sigma then overflows u to inf and the term to -inf, the exact limit, instead of
// producing inf / inf.
template <typename T>
ACN_HD T joint_term(T z, T logit, T shift, T mu, T log_s, T inv_s) {
  const T u = (z - mu) * inv_s;
  return (logit - shift) - log_s - Constants<T>::half_log_2pi - T(0.5) * u * u;
}

// One term of Lz's sum, exp(l_m).
template <typename T>
ACN_HD T weight_term(T logit, T shift) {
  return acn_exp(logit - shift);
}

// Gradients of log p for one component, given the upstream gradient g of log p (already signed:
// -g for the KL), the logits' shift s and the saved T and Lz. r = exp(t - T) is the
// responsibility, w = exp(l - Lz) the weight. A component with r == 0 (zero weight, or negligible
// density) gets exactly zero mean and scale gradients even where u is infinite. Returns the
// contribution to dlog p / dz.
template <typename T>
ACN_HD T component_grads(T g, T z, T logit, T shift, T mu, T log_s, T big_t, T lz, T* dlogit,
                         T* dmu, T* dlog_s) {
  const T inv_s = acn_exp(-log_s);
  const T u = (z - mu) * inv_s;
  const T l = logit - shift;
  // The forward's expression, so that a compiler that contracts multiply-adds does so alike in
  // both and r below is consistent with the saved T.
  const T t = joint_term(z, logit, shift, mu, log_s, inv_s);
  // A row whose every term is -inf (T == -inf) has log p = -inf and, by contract, zero gradients.
  const bool dead = big_t == -inf_v<T>();
  const T r_raw = acn_exp(t - big_t);  // computed unconditionally: a select, not a branch
  const T w_raw = acn_exp(l - lz);
  const T r = dead ? T(0) : r_raw;
  const T w = dead ? T(0) : w_raw;
  const T gr = g * r;
  const T dm = r == T(0) ? T(0) : gr * u * inv_s;
  *dlogit = g * (r - w);
  *dmu = dm;
  *dlog_s = r == T(0) ? T(0) : gr * (u * u - T(1));
  return -dm;
}

// The posterior q of the KL, per dimension: log N(z; c, sigma^2) with sigma = exp(log_s), given
// inv_s = exp(-log_s); KL = log q(z) - log p(z). v = (z - c) * inv_s, not a division by sigma:
// a tiny sigma overflows v to inf and log q to -inf, the limit, instead of inf / inf. log_s is
// subtracted last, so that the unit posterior N(c, 1) (log_s = 0, inv_s = 1) is the same IEEE
// operations as -0.5 e^2 - log(2 pi) / 2 even where the compiler contracts into FMAs (CUDA).
template <typename T>
ACN_HD T gaussian_log_prob(T z, T c, T log_s, T inv_s) {
  const T v = (z - c) * inv_s;
  return (-T(0.5) * v * v - Constants<T>::half_log_2pi) - log_s;
}

// Gradients of g * log N(z; c, sigma^2) (g the upstream gradient of the KL): d/dc = g v / sigma
// to *dc, d/dlog_s = g (v^2 - 1) to *dlog_s; returns d/dz = -g v / sigma. The kernels call it
// with a literal inv_s = 1 for the unit posterior, where it folds to g (z - c) exactly.
template <typename T>
ACN_HD T gaussian_grads(T g, T z, T c, T inv_s, T* dc, T* dlog_s) {
  const T v = (z - c) * inv_s;
  const T gc = g * v * inv_s;
  *dc = gc;
  *dlog_s = g * (v * v - T(1));
  return -gc;
}

}  // namespace acn
