// Device-side helpers shared by the .cu files: element conversions between the input dtypes and
// the accumulation type, the dispatch from a DType tag to a template instantiation, and the
// sm_80+ copy and MMA primitives.
// CUDA toolkit headers only (docs/design.md, "Layout": the .cu files never see torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "launchers.h"

namespace acn {
namespace cuda {

// Accumulation type: double for double inputs, float otherwise (as at::opmath_type).
template <typename T>
using acc_type_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_type_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<scalar_t>{}) for the element type named by dt; unknown tags are a usage error.
template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case DType::kFloat64:
      return f(TypeTag<double>{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// sm_80+ building blocks of the tensor-core kernels: asynchronous copies global -> shared and
// warp-level MMA (PTX mma.sync). Each compiles to nothing below sm_80, where the kernels that use
// them are never launched (masked_topk_plan checks the architecture the kernel was built for).

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ACN_SM80 1
#else
#define ACN_SM80 0
#endif

// Copies Bytes (4, 8 or 16) from global to shared memory without blocking the thread; both
// addresses aligned to Bytes. 16-byte copies bypass L1 (.cg: streamed bank tiles), the small ones
// go through it (.ca: the only form for 4 and 8 bytes).
template <int Bytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if ACN_SM80
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (Bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(s), "l"(gmem), "n"(Bytes) : "memory");
#endif
}

// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if ACN_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until every copy this thread issued has landed (other threads' copies need a barrier).
__device__ __forceinline__ void cp_async_wait_all() {
#if ACN_SM80
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Four 8x8 matrices of 16-bit elements (8 rows of 16 bytes each) from shared memory: lane L gives
// the address of row L % 8 of matrix L / 8, and register m of lane (g = L / 4, t = L % 4) receives
// the 32-bit word t of row g of matrix m, i.e. the layout of the MMA fragments below (for tf32 a
// 32-bit element is one word). Rows 16-byte aligned; conflict-free when the 8 rows of a matrix
// fall in distinct 16-byte bank groups.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
#if ACN_SM80
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
#endif
}

// d += A * B on the tensor cores for one warp, float32 accumulators. Fragment layouts (PTX ISA,
// "Matrix fragments for mma.m16n8k8 / m16n8k16"), with g = lane / 4 and t = lane % 4:
//   m16n8k8 tf32:   a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4];
//                   b0 = B[t][g], b1 = B[t+4][g];
//   m16n8k16 f16/bf16 (two elements per register, the lower column in the low half):
//                   a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
//                   b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g];
//   both:           d0 = D[g][2t], d1 = D[g][2t+1], d2 = D[g+8][2t], d3 = D[g+8][2t+1].
// The tf32 operands must hold TF32 values (float32 bit patterns with the low 13 mantissa bits 0).
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                                 unsigned a3, unsigned b0, unsigned b1) {
#if ACN_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void mma_f16_m16n8k16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                                 unsigned a3, unsigned b0, unsigned b1) {
#if ACN_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                                  unsigned a3, unsigned b0, unsigned b1) {
#if ACN_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Blocks for a grid-stride loop over n items: enough to fill any current GPU, never above the
// x-dimension limit of a grid.
inline unsigned int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace cuda
}  // namespace acn
