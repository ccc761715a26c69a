// CPU kernels of the mixture log-likelihood (forward and backward) and the ACN KL on top of it,
// with the unit posterior N(code, I) or a diagonal one (its log-scale pls), whose per-element
// terms (acn::gaussian_log_prob, acn::gaussian_grads) join the mixture's in the same pass.
//
// Work split: at::parallel_for over rows b; a task's rows are one run of elements (b, d), cut into
// blocks of kLanes consecutive elements (across row boundaries) that are processed lane-wise (the
// innermost loops run over lanes, with no branches and the vectorisable acn_exp/acn_log of
// acn_math.h, so GCC emits SIMD code for them). Components are consumed in chunks of kChunk with
// an online log-sum-exp, so any M works with a fixed buffer. Every block has all kLanes lanes: a
// task's one partial block is staged through a zero-padded copy. (Per-row blocks with a run-time
// lane count in each row's last one had GCC keep those loops scalar: the backward was 3x slower at
// D = 24 or 25 than at D = 16 or 32, issue 16.) Every lane loop is an omp simd loop, the short
// initialisations too: left alone, GCC unrolls those completely, and that kept the backward's
// component loop scalar (10x slower).
//
// The row loops are compiled three times, for AVX-512, AVX2+FMA and the baseline ISA, and the best
// one the CPU runs is picked at run time (as in masked_topk.cpp, with the same ACN_CPU_ISA cap):
// the lane loops are exp/log polynomials, so wider vectors pay off almost linearly, and the
// baseline build (SSE2) leaves 3x on the table on a current x86 CPU. The AVX-512 float variant
// also replaces the stride-M gathers and scatters by a flat layout: a block's parameters are
// read and its gradients written as contiguous vectors, with in-register transposes only for
// the sums and maxima over components.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../utils.h"
#include "cpu_isa.h"
#include "acn_math.h"

// Fused multiply-add contraction on (ISO C++ turns it off by default; nvcc contracts the CUDA
// kernels too). The lane loops are exp/log polynomials: contraction removes about a quarter of
// their instructions and halves the polynomials' dependency chains, which makes both directions
// 15-20% faster on AVX2 and AVX-512 (issue 16). What it costs: the baseline (SSE2) variant has no
// FMA, so results may differ between ISA variants in the last bits (each is within the contract's
// tolerance, tests/test_cpu.py). The backward recomputes each joint term with the forward's
// expression (acn::joint_term), so both contract it alike and a responsibility exp(t - T) stays
// consistent with the saved T. (Decision and the training-comparison tolerance: docs/design.md.)
#pragma GCC optimize("fp-contract=fast")

// The row loops are inlined into each ISA variant (below), so each is compiled for its own ISA.
#define ACN_BODY inline __attribute__((always_inline))

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 16;

struct MixtureArgs {
  int64_t B, D, M;
  bool per_dim;
};

// Running log-sum-exp per lane: merge a chunk of cm terms x[j][lane] whose per-lane maxima are
// cmx into (mx, sum). Lanes innermost, so the exps vectorise. first: (mx, sum) still hold their
// start values (-inf, 0), so the merged maximum is cmx and the zero sum needs no rescale; skipping
// that exp saves one of the 3M + 1 exps per dimension when M <= kChunk, with identical results.
template <typename acc_t>
ACN_BODY void lse_merge(acc_t* mx, acc_t* sum, const acc_t* cmx, const acc_t (*x)[kLanes], int64_t cm,
                        bool first) {
  acc_t shift[kLanes];
  if (first) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      shift[l] = acn::lse_shift(cmx[l]);
      mx[l] = cmx[l];
    }
  } else {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t new_mx = acn::max_of(mx[l], cmx[l]);
      shift[l] = acn::lse_shift(new_mx);
      // sum == 0 means no finite term yet: skip the rescale, whose factor may overflow.
      const acc_t f = acn::acn_exp(acn::lse_shift(mx[l]) - shift[l]);
      sum[l] = sum[l] == acc_t(0) ? acc_t(0) : sum[l] * f;
      mx[l] = new_mx;
    }
  }
  for (int64_t j = 0; j < cm; ++j) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) sum[l] += acn::acn_exp(x[j][l] - shift[l]);
  }
}

// The logits' shift per lane (acn_math.h): lse_shift of the maximum of x[j][lane] over j < M.
template <typename acc_t>
ACN_BODY void logit_shift(const acc_t (*x)[kLanes], int64_t M, acc_t* shift) {
  acc_t mx[kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) mx[l] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < M; ++j) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) mx[l] = acn::max_of(mx[l], x[j][l]);
  }
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) shift[l] = acn::lse_shift(mx[l]);
}

#if defined(__x86_64__) || defined(__i386__)
#define ACN_HAVE_TRANSPOSE 1
// Block transposes for the AVX-512 variant. The lane loops read component j of 16 consecutive
// dims, a stride-M gather that GCC assembles from scalar loads and inserts (and scatters the
// gradients likewise); for full float blocks (any M <= kChunk) this moves the block's 16 * M
// contiguous values with M vector loads and M * ceil(M / 2) two-source permutes instead.
// Out of line: the row loops that call them are compiled without a target before they are
// inlined into their ISA variants, and GCC checks always_inline against that generic copy.
#define ACN_AVX512_FN __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma")))

// dst[j][l] = src[l * M + j]. Output j takes lane l from element s = l * M + j, i.e. from the
// vector pair (v[2p], v[2p + 1]) with p = s / 32, at index s % 32 (vpermt2ps reads 5 bits).
ACN_AVX512_FN void load_block(const float* src, int64_t M, float (*dst)[kLanes]) {
  __m512 v[kChunk];
  for (int64_t k = 0; k < M; ++k) v[k] = _mm512_loadu_ps(src + kLanes * k);
  const __m512i lane_m =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(M)));
  for (int64_t j = 0; j < M; ++j) {
    const __m512i s = _mm512_add_epi32(lane_m, _mm512_set1_epi32(static_cast<int>(j)));
    const __m512i pair = _mm512_srli_epi32(s, 5);
    __m512 out = _mm512_setzero_ps();
    for (int64_t p = 0; 2 * p < M; ++p) {
      const __mmask16 m = _mm512_cmpeq_epi32_mask(pair, _mm512_set1_epi32(static_cast<int>(p)));
      const __m512 hi = 2 * p + 1 < M ? v[2 * p + 1] : v[2 * p];
      out = _mm512_mask_mov_ps(out, m, _mm512_permutex2var_ps(v[2 * p], s, hi));
    }
    _mm512_storeu_ps(dst[j], out);
  }
}

// The flat layout: vector k of a block's 16 * M parameters holds element s = 16k + q in lane q,
// i.e. component s % M of lane s / M. out[i][q] = v[i][(16k + q) / M] spreads N per-lane values
// over their M components there (one permute each).
template <int N>
ACN_AVX512_FN void spread(int64_t M, int64_t k, const float* const (&v)[N], float (*out)[kLanes]) {
  const __m512i s = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32(static_cast<int>(kLanes * k)));
  // s / M in float (AVX-512F has no integer division): exact, as s < 256 keeps every
  // non-integer quotient at least 1/16 away from an integer.
  const __m512i l = _mm512_cvttps_epi32(
      _mm512_div_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(static_cast<float>(M))));
  for (int i = 0; i < N; ++i) _mm512_storeu_ps(out[i], _mm512_permutexvar_ps(l, _mm512_loadu_ps(v[i])));
}

// The flat vectors that hold the first n lanes' components, ceil(n * M / 16): a staged partial block
// computes only those. The rest of the flat buffer (read by the transpose, for discarded lanes)
// is zeroed.
inline int64_t flat_vectors(int64_t n, int64_t M, float* flat) {
  const int64_t nv = (n * M + kLanes - 1) / kLanes;
  std::fill(flat + nv * kLanes, flat + M * kLanes, 0.0f);
  return nv;
}
#undef ACN_AVX512_FN

// Where the flat layout pays (AVX-512, float, one thread, issue 16): it transposes two arrays per
// block (M * ceil(M / 2) permutes each) instead of the six (forward: three) of a per-component
// layout, plus N permutes per flat vector in spread. The backward gains 20-40% over the
// per-component layout for 5 <= M <= 16 (more with M) and takes it up to load_block's limit;
// the forward gains 0-10% for 3 <= M <= 12, and at M = 1, 2 or above 12 the permutes cost what
// they save, so those M take the generic path.
constexpr int64_t kFwdFlatMinM = 3;
constexpr int64_t kFwdFlatMaxM = 12;
constexpr int64_t kBwdFlatMaxM = kChunk;
#else
#define ACN_HAVE_TRANSPOSE 0
#endif

// One block of kLanes consecutive elements of a row: z[l] and, for component j, lg[l * M + j]
// (likewise mu, ls); the first n lanes are live (the others a staged block's zero padding).
// Writes T and Lz (acn_math.h) of every lane to bt, lz.
// kFlat (AVX-512 variant, float): M in the range above computes the joint terms in the flat
// layout (spread) and transposes them (load_block) for the sums over components.
template <typename acc_t>
ACN_BODY void fwd_finish(const acc_t* mxt, const acc_t* st, const acc_t* sl, acc_t* bt, acc_t* lz) {
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    bt[l] = acn::lse_finish(acn::lse_shift(mxt[l]), st[l]);
    lz[l] = acn::lse_finish(acc_t(0), sl[l]);  // the shifted logits' maximum is 0
  }
}

template <typename scalar_t, bool kFlat>
ACN_BODY void fwd_block(int64_t M, int64_t n, const scalar_t* z, const scalar_t* lg, const scalar_t* mu,
                        const scalar_t* ls, at::opmath_type<scalar_t>* bt,
                        at::opmath_type<scalar_t>* lz) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t zz[kLanes], sh[kLanes], sl[kLanes], mxt[kLanes], st[kLanes], cmt[kLanes];
  acc_t tl[kChunk][kLanes], tt[kChunk][kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    zz[l] = static_cast<acc_t>(z[l]);
    sl[l] = st[l] = 0;
    mxt[l] = ninf;
  }
#if ACN_HAVE_TRANSPOSE
  if constexpr (kFlat) {
    if (M >= kFwdFlatMinM && M <= kFwdFlatMaxM) {
      // The joint terms in the flat layout, transposed for the sums over components.
      float bl[kChunk][kLanes], flat_t[kChunk * kLanes];
      load_block(lg, M, bl);
      logit_shift(bl, M, sh);
      const int64_t nv = flat_vectors(n, M, flat_t);
      for (int64_t k = 0; k < nv; ++k) {
        float sp[2][kLanes];  // z and the shift of each flat element of vector k
        spread<2>(M, k, {zz, sh}, sp);
        const int64_t f0 = kLanes * k;
#pragma omp simd
        for (int64_t q = 0; q < kLanes; ++q) {
          const int64_t f = f0 + q;
          flat_t[f] = acn::joint_term(sp[0][q], lg[f], sp[1][q], mu[f], ls[f], acn::acn_exp(-ls[f]));
        }
      }
      load_block(flat_t, M, tt);
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) cmt[l] = ninf;
      for (int64_t j = 0; j < M; ++j) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          cmt[l] = acn::max_of(cmt[l], tt[j][l]);
          sl[l] += acn::weight_term(bl[j][l], sh[l]);
        }
      }
      lse_merge(mxt, st, cmt, tt, M, true);
      fwd_finish(mxt, st, sl, bt, lz);
      return;
    }
  }
#endif
  // The shift needs every logit before the first joint term; the first chunk's logits stay in tl.
  acc_t mxl[kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) mxl[l] = ninf;
  for (int64_t j = 0; j < M; ++j) {
    if (j < kChunk) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        tl[j][l] = static_cast<acc_t>(lg[l * M + j]);
        mxl[l] = acn::max_of(mxl[l], tl[j][l]);
      }
    } else {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l)
        mxl[l] = acn::max_of(mxl[l], static_cast<acc_t>(lg[l * M + j]));
    }
  }
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) sh[l] = acn::lse_shift(mxl[l]);
  for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
    const int64_t cm = std::min(kChunk, M - m0);
    for (int64_t j = 0; j < (m0 > 0 ? cm : 0); ++j) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) tl[j][l] = static_cast<acc_t>(lg[l * M + m0 + j]);
    }
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) cmt[l] = ninf;
    for (int64_t j = 0; j < cm; ++j) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t i = l * M + m0 + j;
        const acc_t log_s = static_cast<acc_t>(ls[i]);
        const acc_t t = acn::joint_term(zz[l], tl[j][l], sh[l], static_cast<acc_t>(mu[i]), log_s,
                                        acn::acn_exp(-log_s));
        tt[j][l] = t;
        cmt[l] = acn::max_of(cmt[l], t);
        sl[l] += acn::weight_term(tl[j][l], sh[l]);
      }
    }
    lse_merge(mxt, st, cmt, tt, cm, m0 == 0);
  }
  fwd_finish(mxt, st, sl, bt, lz);
}

// The zero-padded copy of a partial block, n < kLanes lanes: z [kLanes], then each of the
// [kLanes, M] parameter arrays. The lanes from n on stay zero (a finite, discarded element).
// count: the elements of the range the blocks cover (a buffer only if count % kLanes != 0).
template <typename scalar_t>
struct TailStage {
  std::vector<scalar_t> buf;
  int64_t M;
  TailStage(int64_t count, int64_t M_)
      : buf(count % kLanes ? kLanes * (1 + 3 * M_) : 0, scalar_t(0)), M(M_) {}
  scalar_t* z() { return buf.data(); }
  scalar_t* param(int k) { return buf.data() + kLanes + k * kLanes * M; }
  void load(const scalar_t* z_src, const scalar_t* const (&p_src)[3], int64_t n) {
    std::copy(z_src, z_src + n, z());
    for (int k = 0; k < 3; ++k) std::copy(p_src[k], p_src[k] + n * M, param(k));
  }
};

// The posterior's log q (acn::gaussian_log_prob) of n consecutive elements, to lq. Lane loops of
// their own: inside the scalar loop that adds row sums, the exp kept them scalar and cost more
// than the PyTorch composition it replaces. Without pls the unit posterior with literal
// log-scale 0 and inverse scale 1, which fold away: the expression of -0.5 (z - c)^2 -
// log(2 pi) / 2 as before the log-scale existed, contracted alike.
template <typename scalar_t>
ACN_BODY void posterior_log_prob(int64_t n, const scalar_t* z, const scalar_t* c, const scalar_t* pls,
                                 at::opmath_type<scalar_t>* lq) {
  using acc_t = at::opmath_type<scalar_t>;
  if (pls) {
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) {
      const acc_t s = static_cast<acc_t>(pls[l]);
      lq[l] = acn::gaussian_log_prob(static_cast<acc_t>(z[l]), static_cast<acc_t>(c[l]), s, acn::acn_exp(-s));
    }
  } else {
#pragma omp simd
    for (int64_t l = 0; l < n; ++l)
      lq[l] = acn::gaussian_log_prob(static_cast<acc_t>(z[l]), static_cast<acc_t>(c[l]), acc_t(0), acc_t(1));
  }
}

// The posterior's gradients (acn::gaussian_grads) of n consecutive elements, given the KL's
// upstream gradient go: added to gz (dlog q / dz), written to dc and (with pls) dpls.
template <typename scalar_t>
ACN_BODY void posterior_grads(int64_t n, const at::opmath_type<scalar_t>* go, const scalar_t* z,
                              const scalar_t* c, const scalar_t* pls, at::opmath_type<scalar_t>* gz,
                              scalar_t* dc, scalar_t* dpls) {
  using acc_t = at::opmath_type<scalar_t>;
  if (pls) {
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) {
      acc_t d, q;
      gz[l] += acn::gaussian_grads(go[l], static_cast<acc_t>(z[l]), static_cast<acc_t>(c[l]),
                                   acn::acn_exp(-static_cast<acc_t>(pls[l])), &d, &q);
      dc[l] = static_cast<scalar_t>(d);
      dpls[l] = static_cast<scalar_t>(q);
    }
  } else {
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) {
      acc_t d, q;  // inverse scale 1: exactly g (z - c), as before the log-scale existed
      gz[l] += acn::gaussian_grads(go[l], static_cast<acc_t>(z[l]), static_cast<acc_t>(c[l]), acc_t(1), &d, &q);
      dc[l] = static_cast<scalar_t>(d);
    }
  }
}

// Rows b0 .. b1 as one run of elements e = b * D + d: blocks take kLanes consecutive elements
// across row boundaries, so only the run's last block can be partial (a per-row block split left
// D % 16 lanes idle in every row: a third of the work at D = 24, 13/16 at D = 3). Row sums
// still add a row's values in order of d.
template <typename scalar_t, bool kFlat>
ACN_BODY void fwd_rows(const MixtureArgs& a, const scalar_t* z, const scalar_t* lg, const scalar_t* mu,
              const scalar_t* ls, const scalar_t* code, const scalar_t* pls,
              at::opmath_type<scalar_t>* out, at::opmath_type<scalar_t>* lse, int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D, M = a.M, e_end = b1 * D;
  if (D == 0) {
    for (int64_t b = b0; b < (a.per_dim ? b0 : b1); ++b) out[b] = 0;  // empty sums
    return;
  }
  TailStage<scalar_t> tail(e_end - b0 * D, M);
  int64_t b = b0, d = 0;  // the row and dimension of the next element
  acc_t row = 0;
  for (int64_t e0 = b0 * D; e0 < e_end; e0 += kLanes) {
    const int64_t n = std::min(kLanes, e_end - e0);
    acc_t bt[kLanes], lz[kLanes];
    if (n == kLanes) {
      fwd_block<scalar_t, kFlat>(M, n, z + e0, lg + e0 * M, mu + e0 * M, ls + e0 * M, bt, lz);
    } else {
      tail.load(z + e0, {lg + e0 * M, mu + e0 * M, ls + e0 * M}, n);
      fwd_block<scalar_t, kFlat>(M, n, tail.z(), tail.param(0), tail.param(1), tail.param(2), bt, lz);
    }
    acc_t lq[kLanes];
    if (code) posterior_log_prob(n, z + e0, code + e0, pls ? pls + e0 : nullptr, lq);
    for (int64_t l = 0; l < n; ++l) {
      lse[2 * (e0 + l)] = bt[l];
      lse[2 * (e0 + l) + 1] = lz[l];
      acc_t v = bt[l] - lz[l];
      if (code) v = lq[l] - v;
      if (a.per_dim) {
        out[e0 + l] = v;
      } else {
        row += v;
        if (++d == D) {
          out[b++] = row;
          row = 0;
          d = 0;
        }
      }
    }
  }
}

// The backward of one block (layout and n as in fwd_block): per-component gradients to dlg, dmu,
// dls (same layout), the mixture's part of dlog p / dz to gz. g, bt, lz per lane.
template <typename scalar_t, bool kFlat>
ACN_BODY void bwd_block(int64_t M, int64_t n, const at::opmath_type<scalar_t>* g, const scalar_t* z,
                        const scalar_t* lg, const scalar_t* mu, const scalar_t* ls,
                        const at::opmath_type<scalar_t>* bt, const at::opmath_type<scalar_t>* lz,
                        scalar_t* dlg, scalar_t* dmu, scalar_t* dls, at::opmath_type<scalar_t>* gz) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t zz[kLanes], sh[kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    zz[l] = static_cast<acc_t>(z[l]);
    gz[l] = 0;
  }
#if ACN_HAVE_TRANSPOSE
  if constexpr (kFlat) {
    if (M <= kBwdFlatMaxM) {
      float bl[kChunk][kLanes], flat_gz[kChunk * kLanes], tg[kChunk][kLanes];
      load_block(lg, M, bl);
      logit_shift(bl, M, sh);
      const int64_t nv = flat_vectors(n, M, flat_gz);
      for (int64_t k = 0; k < nv; ++k) {
        float sp[5][kLanes];  // g, z, shift, T, Lz of each flat element of vector k
        spread<5>(M, k, {g, zz, sh, bt, lz}, sp);
        const int64_t f0 = kLanes * k;
#pragma omp simd
        for (int64_t q = 0; q < kLanes; ++q) {
          const int64_t f = f0 + q;
          float dl, dm, ds;
          flat_gz[f] = acn::component_grads(sp[0][q], sp[1][q], lg[f], sp[2][q], mu[f], ls[f],
                                            sp[3][q], sp[4][q], &dl, &dm, &ds);
          dlg[f] = dl;
          dmu[f] = dm;
          dls[f] = ds;
        }
      }
      load_block(flat_gz, M, tg);  // summed over the components in order, as below
      for (int64_t j = 0; j < M; ++j) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) gz[l] += tg[j][l];
      }
      return;
    }
  }
#endif
  acc_t mxl[kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) mxl[l] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < M; ++j) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l)
      mxl[l] = acn::max_of(mxl[l], static_cast<acc_t>(lg[l * M + j]));
  }
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) sh[l] = acn::lse_shift(mxl[l]);
  for (int64_t j = 0; j < M; ++j) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t i = l * M + j;
      acc_t dl, dm, ds;
      gz[l] += acn::component_grads(g[l], zz[l], static_cast<acc_t>(lg[i]), sh[l],
                                    static_cast<acc_t>(mu[i]), static_cast<acc_t>(ls[i]), bt[l],
                                    lz[l], &dl, &dm, &ds);
      dlg[i] = static_cast<scalar_t>(dl);
      dmu[i] = static_cast<scalar_t>(dm);
      dls[i] = static_cast<scalar_t>(ds);
    }
  }
}

template <typename scalar_t, bool kFlat>
ACN_BODY void bwd_rows(const MixtureArgs& a, const at::opmath_type<scalar_t>* grad, const scalar_t* z,
              const scalar_t* lg, const scalar_t* mu, const scalar_t* ls, const scalar_t* code,
              const scalar_t* pls, const at::opmath_type<scalar_t>* lse, scalar_t* dz,
              scalar_t* dlg, scalar_t* dmu, scalar_t* dls, scalar_t* dcode, scalar_t* dpls,
              int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D, M = a.M, e_end = b1 * D;  // blocks as in fwd_rows
  TailStage<scalar_t> tail(e_end - b0 * D, M);
  std::vector<scalar_t> tail_grads(tail.buf.empty() ? 0 : 3 * kLanes * M);  // dlg, dmu, dls
  int64_t b = b0, d = 0;  // the row and dimension of the next element
  for (int64_t e0 = b0 * D; e0 < e_end; e0 += kLanes) {
    const int64_t n = std::min(kLanes, e_end - e0);
    // Padding lanes (l >= n) get g = 0 and finite T, Lz: their results are discarded.
    acc_t g[kLanes] = {}, gz[kLanes], bt[kLanes] = {}, lz[kLanes] = {};
    for (int64_t l = 0; l < n; ++l) {
      const acc_t go = a.per_dim ? grad[e0 + l] : grad[b];
      g[l] = code ? -go : go;  // KL = log q(z) - log p
      bt[l] = lse[2 * (e0 + l)];
      lz[l] = lse[2 * (e0 + l) + 1];
      if (++d == D) {
        d = 0;
        ++b;
      }
    }
    if (n == kLanes) {
      bwd_block<scalar_t, kFlat>(M, n, g, z + e0, lg + e0 * M, mu + e0 * M, ls + e0 * M, bt, lz,
                                 dlg + e0 * M, dmu + e0 * M, dls + e0 * M, gz);
    } else {
      tail.load(z + e0, {lg + e0 * M, mu + e0 * M, ls + e0 * M}, n);
      scalar_t* tg = tail_grads.data();
      bwd_block<scalar_t, kFlat>(M, n, g, tail.z(), tail.param(0), tail.param(1), tail.param(2), bt,
                                 lz, tg, tg + kLanes * M, tg + 2 * kLanes * M, gz);
      std::copy(tg, tg + n * M, dlg + e0 * M);
      std::copy(tg + kLanes * M, tg + kLanes * M + n * M, dmu + e0 * M);
      std::copy(tg + 2 * kLanes * M, tg + 2 * kLanes * M + n * M, dls + e0 * M);
    }
    if (code) {
      acc_t go[kLanes];  // the KL's upstream gradient (g is that of log p, negated)
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) go[l] = -g[l];
      posterior_grads(n, go, z + e0, code + e0, pls ? pls + e0 : nullptr, gz, dcode + e0,
                      pls ? dpls + e0 : nullptr);
    }
    for (int64_t l = 0; l < n; ++l) dz[e0 + l] = static_cast<scalar_t>(gz[l]);
  }
}

// One copy of the row loops per ISA. The attributes only widen the instruction set: the same
// source and operations, up to the FMA contraction above.
#define ACN_ROWS_VARIANT(SUFFIX, TARGET, TR)                                                         \
  template <typename scalar_t>                                                                    \
  TARGET void fwd_rows_##SUFFIX(const MixtureArgs& a, const scalar_t* z, const scalar_t* lg,      \
                                const scalar_t* mu, const scalar_t* ls, const scalar_t* code,     \
                                const scalar_t* pls, at::opmath_type<scalar_t>* out,              \
                                at::opmath_type<scalar_t>* lse, int64_t b0, int64_t b1) {         \
    fwd_rows<scalar_t, TR>(a, z, lg, mu, ls, code, pls, out, lse, b0, b1);                        \
  }                                                                                               \
  template <typename scalar_t>                                                                    \
  TARGET void bwd_rows_##SUFFIX(const MixtureArgs& a, const at::opmath_type<scalar_t>* grad,      \
                                const scalar_t* z, const scalar_t* lg, const scalar_t* mu,        \
                                const scalar_t* ls, const scalar_t* code, const scalar_t* pls,    \
                                const at::opmath_type<scalar_t>* lse, scalar_t* dz,               \
                                scalar_t* dlg, scalar_t* dmu, scalar_t* dls, scalar_t* dcode,     \
                                scalar_t* dpls, int64_t b0, int64_t b1) {                         \
    bwd_rows<scalar_t, TR>(a, grad, z, lg, mu, ls, code, pls, lse, dz, dlg, dmu, dls, dcode, dpls, \
                           b0, b1);                                                               \
  }
ACN_ROWS_VARIANT(avx512, ACN_TARGET_AVX512,
                 (std::is_same<scalar_t, float>::value && ACN_HAVE_TRANSPOSE))
ACN_ROWS_VARIANT(avx2, ACN_TARGET_AVX2, false)
ACN_ROWS_VARIANT(base, , false)
#undef ACN_ROWS_VARIANT

// Rows per parallel task: enough elements that thread start-up is amortised.
int64_t grain_rows(int64_t D, int64_t M) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D * M)); }

std::tuple<at::Tensor, at::Tensor> mixture_fwd_cpu(const at::Tensor& z_, const at::Tensor& logits_,
                                                   const at::Tensor& means_,
                                                   const at::Tensor& log_scales_,
                                                   const c10::optional<at::Tensor>& code_,
                                                   bool per_dim,
                                                   const c10::optional<at::Tensor>& pls_) {
  acn::check_mixture_args(z_, logits_, means_, log_scales_, code_, pls_);
  TORCH_CHECK(z_.device().is_cpu(), "z must be a CPU tensor for the cpu backend");
  const auto z = z_.contiguous(), lg = logits_.contiguous(), mu = means_.contiguous(),
             ls = log_scales_.contiguous();
  const at::Tensor code = code_.has_value() ? code_->contiguous() : at::Tensor();
  const at::Tensor pls = pls_.has_value() ? pls_->contiguous() : at::Tensor();
  const MixtureArgs a{z.size(0), z.size(1), lg.size(2), per_dim};
  const auto opts = z.options().dtype(acn::acc_dtype(z.scalar_type()));
  at::Tensor out = per_dim ? acn::new_output({a.B, a.D}, opts) : acn::new_output({a.B}, opts);
  at::Tensor lse = acn::new_output({a.B, a.D, 2}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mixture_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = code.defined() ? code.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = pls.defined() ? pls.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, a.B, grain_rows(a.D, a.M), [&](int64_t b0, int64_t b1) {
      auto* f = acn::cpu_isa() == acn::Isa::kAvx512 ? &fwd_rows_avx512<scalar_t>
                : acn::cpu_isa() == acn::Isa::kAvx2 ? &fwd_rows_avx2<scalar_t>
                                      : &fwd_rows_base<scalar_t>;
      f(a, z.data_ptr<scalar_t>(), lg.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
        ls.data_ptr<scalar_t>(), cp, pp, out.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), b0, b1);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& z_, const at::Tensor& logits_,
    const at::Tensor& means_, const at::Tensor& log_scales_, const c10::optional<at::Tensor>& code_,
    const at::Tensor& lse_, bool per_dim, const c10::optional<at::Tensor>& pls_) {
  acn::check_mixture_args(z_, logits_, means_, log_scales_, code_, pls_);
  const auto z = z_.contiguous(), lg = logits_.contiguous(), mu = means_.contiguous(),
             ls = log_scales_.contiguous();
  const at::Tensor code = code_.has_value() ? code_->contiguous() : at::Tensor();
  const at::Tensor pls = pls_.has_value() ? pls_->contiguous() : at::Tensor();
  const MixtureArgs a{z.size(0), z.size(1), lg.size(2), per_dim};
  const auto acc = acn::acc_dtype(z.scalar_type());
  TORCH_CHECK(lse_.sizes() == at::IntArrayRef({a.B, a.D, 2}) && lse_.scalar_type() == acc,
              "lse must be the [B, D, 2] tensor saved by mixture_fwd");
  const auto grad = grad_.to(acc).contiguous();
  TORCH_CHECK(grad.numel() == (per_dim ? a.B * a.D : a.B), "grad_out has the wrong shape ",
              grad.sizes());
  const auto lse = lse_.contiguous();
  at::Tensor dz = acn::new_output(z.sizes(), z.options());
  at::Tensor dlg = acn::new_output(lg.sizes(), lg.options());
  at::Tensor dmu = acn::new_output(lg.sizes(), lg.options());
  at::Tensor dls = acn::new_output(lg.sizes(), lg.options());
  at::Tensor dcode = code.defined() ? acn::new_output(z.sizes(), z.options()) : at::empty({0}, z.options());
  at::Tensor dpls = pls.defined() ? acn::new_output(z.sizes(), z.options()) : at::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mixture_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = code.defined() ? code.data_ptr<scalar_t>() : nullptr;
    scalar_t* dcp = code.defined() ? dcode.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = pls.defined() ? pls.data_ptr<scalar_t>() : nullptr;
    scalar_t* dpp = pls.defined() ? dpls.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, a.B, grain_rows(a.D, a.M), [&](int64_t b0, int64_t b1) {
      auto* f = acn::cpu_isa() == acn::Isa::kAvx512 ? &bwd_rows_avx512<scalar_t>
                : acn::cpu_isa() == acn::Isa::kAvx2 ? &bwd_rows_avx2<scalar_t>
                                      : &bwd_rows_base<scalar_t>;
      f(a, grad.data_ptr<acc_t>(), z.data_ptr<scalar_t>(), lg.data_ptr<scalar_t>(),
        mu.data_ptr<scalar_t>(), ls.data_ptr<scalar_t>(), cp, pp, lse.data_ptr<acc_t>(),
        dz.data_ptr<scalar_t>(), dlg.data_ptr<scalar_t>(), dmu.data_ptr<scalar_t>(),
        dls.data_ptr<scalar_t>(), dcp, dpp, b0, b1);
    });
  });
  return {dz, dlg, dmu, dls, dcode, dpls};
}

}  // namespace

TORCH_LIBRARY_IMPL(acn_kernels, CPU, m) {
  m.impl("mixture_fwd", &mixture_fwd_cpu);
  m.impl("mixture_bwd", &mixture_bwd_cpu);
}
