// The error band of the masked top-K distance filter (docs/filter-band.md), shared by every
// kernel that filters with the expanded form |x|^2 + |y|^2 - 2 <x, y>. The same function as
// acn_kernels/filter_band.py, written with the same double operations in the same order, so both
// give bit-identical constants (tests/test_filter_band.py compares them on a table of cases).
//
// A pair is rejected only when  F > tau + alpha * tau + beta * (nx + ny) + eta * (l1x + l1y) + abs,
// with F the expanded form as computed, tau the current k-th reported (direct-form) distance,
// nx, ny the computed squared norms and l1x, l1y the computed 1-norms of the (shifted) operands.
// A pair whose reported distance is <= tau is then never rejected. No torch headers (nvcc
// compiles it raw); host code only: the constants are computed once per call.
#pragma once

#include <cstdint>
#include <limits>

namespace acn {

// How the matrix unit sees its operands (docs/filter-band.md, "Operand models").
enum class FilterInputs {
  kExact,   // operands used as they are (a CPU GEMM in the accumulation type)
  kTF32,    // TF32: truncation to 10 mantissa bits at worst; subnormals may be flushed
  kTF32x3,  // 3xTF32: big*big + big*small + small*big
  kBF16,    // bfloat16, rounded to nearest
  kBF16x3,  // bf16 split: hi*hi + hi*lo + lo*hi
  kFP16,    // float16, rounded to nearest, subnormals may be flushed (|operand| <= 65504 only)
};

struct FilterInputModel {
  double u_in;    // relative rounding of an operand
  double eta_in;  // absolute rounding of an operand (flushed subnormals)
  int terms;      // products per term of the dot product
  bool faithful;  // the accumulator rounds faithfully (up to one ulp, tensor cores), not to nearest
};

inline FilterInputModel filter_input_model(FilterInputs in) {
  switch (in) {
    case FilterInputs::kExact: return {0.0, 0.0, 1, false};
    case FilterInputs::kTF32: return {0x1p-10, 0x1p-126, 1, true};
    case FilterInputs::kTF32x3: return {0x1p-19, 0x1p-125, 3, true};
    case FilterInputs::kBF16: return {0x1p-8, 0x1p-126, 1, true};
    case FilterInputs::kBF16x3: return {0x1p-15, 0x1p-125, 3, true};
    case FilterInputs::kFP16: return {0x1p-11, 0x1p-14, 1, true};
  }
  return {0.0, 0.0, 1, false};
}

struct FilterBand {
  double alpha, beta, eta, abs;
};

// gamma_n = n v / (1 - n v); +inf where n v >= 1/2 (the filter must then reject nothing).
inline double filter_gamma(double n, double v) {
  const double nv = n * v;
  return nv < 0.5 ? nv / (1.0 - nv) : std::numeric_limits<double>::infinity();
}

// Band coefficients for dimension D; unit and tiny are the unit roundoff (2^-24, 2^-53) and the
// smallest normal of the accumulation type. centred: the operands are fl(q - c), fl(b - c).
// Rounding the doubles to float stays inside the band's factor-2 margin.
inline FilterBand filter_band(int64_t D, FilterInputs inputs, bool centred, double unit,
                              double tiny) {
  const FilterInputModel m = filter_input_model(inputs);
  const double d = static_cast<double>(D);
  const double u = unit;
  const double u_acc = m.faithful ? 2.0 * u : u;
  const double g_norm = filter_gamma(d, u);
  const double g_dir = filter_gamma(d + 2, u);
  const double g_acc = filter_gamma(2.0 * m.terms * d + 2.0, u_acc);
  const double inf = std::numeric_limits<double>::infinity();
  if (g_norm == inf || g_dir == inf || g_acc == inf) return {inf, inf, inf, inf};
  const double rho = (1.0 + m.u_in) * (1.0 + m.u_in) * (1.0 + 0x1p-6);
  double c_s = g_norm + (2.0 * m.u_in + m.u_in * m.u_in) + g_acc * rho;
  if (centred) c_s += (4.0 * u + 2.0 * u * u) / ((1.0 - u) * (1.0 - u));
  const double c_l = 2.0 * (1.0 + g_acc) * (1.0 + m.u_in) * m.eta_in;
  const double c_0 = 2.0 * (1.0 + g_acc) * d * m.eta_in * m.eta_in;
  FilterBand band;
  band.alpha = 2.0 * (1.0 / (1.0 - g_dir) - 1.0) + 16.0 * u;
  band.beta = 2.0 * c_s / (1.0 - g_norm) + 32.0 * u;
  band.eta = 2.0 * c_l / (1.0 - g_norm);
  band.abs = 2.0 * (c_0 + (d + 8) * tiny);
  return band;
}

template <typename T>
FilterBand filter_band_for(int64_t D, FilterInputs inputs, bool centred) {
  return filter_band(D, inputs, centred, std::numeric_limits<T>::epsilon() / 2,
                     static_cast<double>(std::numeric_limits<T>::min()));
}

}  // namespace acn
