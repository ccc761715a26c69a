// Raw-pointer launchers of the CUDA kernels, shared by the .cu files (which define them) and the
// torch bindings in the .cpp files (which call them). Only the CUDA runtime API appears here, so
// both nvcc without torch and the host compiler with torch include it.
//
// Conventions: every tensor is contiguous and on the current device; sizes are int64 and every
// offset is computed in 64 bits; `acc` pointers are float for float32/float16/bfloat16 inputs and
// double for float64 inputs. Each launcher enqueues on `stream` and returns the launch status
// (cudaGetLastError after the launch), which the caller must check.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace acn {
namespace cuda {

// Element type of the input tensors; the accumulation type follows from it (see above).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---------------------------------------------------------------------------------------------
// Mixture log-likelihood (csrc/cpu/mixture.cpp is the spec in code).

// z [B, D]; logits/means/log_scales [B, D, M]; code [B, D] or nullptr; pls (the posterior's
// log-scale) [B, D] or nullptr, only with code.
// Writes lse [B, D, 2] (acc: T, Lz) and out (acc): [B, D] if per_dim, else [B].
cudaError_t mixture_fwd(DType dt, int64_t B, int64_t D, int64_t M, const void* z,
                        const void* logits, const void* means, const void* log_scales,
                        const void* code, const void* pls, bool per_dim, void* out, void* lse,
                        cudaStream_t stream);

// grad (acc): [B, D] if per_dim, else [B]; lse (acc) [B, D, 2] from mixture_fwd.
// Writes dz [B, D], dlogits/dmeans/dlog_scales [B, D, M], when code is given dcode [B, D] and
// when pls is given dpls [B, D], all in the input dtype.
cudaError_t mixture_bwd(DType dt, int64_t B, int64_t D, int64_t M, const void* grad,
                        const void* z, const void* logits, const void* means,
                        const void* log_scales, const void* code, const void* pls,
                        const void* lse, bool per_dim, void* dz, void* dlogits, void* dmeans,
                        void* dlog_scales, void* dcode, void* dpls, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Masked top-k (contract: docs/design.md, "masked_topk"; scheme: the top of masked_topk.cu).
//
// Two paths, chosen by the plan. Tensor cores (float32/float16/bfloat16 inputs, sm_80 and up,
// B >= 32, D small enough for the tiles to fit in shared memory): the bank's eligible rows are
// compacted, tiles of 64-128 queries are filtered against bank tiles on the tensor cores and the
// survivors rescored in the direct form. SIMT (float64, older GPUs, small batches, large D): the
// exact direct form for every pair. Both give each (query, bank split) a sorted list; a merge
// tree reduces the `splits` lists of each query, FAN_IN at a time, so that one query against a
// large bank is merged by many blocks. The plan fixes the sizes, so the caller can allocate the
// workspace (workspace_bytes, on the device) before the launch.

struct TopkPlan {
  int64_t B = 0, N = 0, D = 0;
  int k = 0;
  DType dt = DType::kFloat32;
  bool tensor_cores = false;  // the tensor-core filter path, else the SIMT path
  int queries_per_block = 1;  // queries sharing one bank tile in a block
  int tile_rows = 0;          // tensor cores: bank rows per tile
  int flush_groups = 0;       // tensor cores: queries whose lists a flush merges at once
  int64_t split_rows = 0;     // SIMT: bank rows per split (a multiple of the tile height)
  int64_t splits = 1;         // number of bank splits
  size_t smem_bytes = 0;      // dynamic shared memory of the partial kernel
  size_t workspace_bytes = 0; // device workspace of masked_topk (may be 0)
};

// Chooses the path, block shape and split count for the current device. Fails
// (cudaErrorInvalidValue) on sizes the kernels cannot take.
cudaError_t masked_topk_plan(DType dt, int64_t B, int64_t N, int64_t D, int k, TopkPlan* plan);

// queries [B, D], bank [N, D] (dtype plan.dt); exclude_mask [N] bool or nullptr; exclude_index
// [B] int64 or nullptr (-1 = none; any value outside [0, N) excludes nothing). Writes dists
// [B, k] (acc) and indices [B, k] int64. workspace: plan.workspace_bytes bytes of device memory,
// 256-byte aligned (nullptr when that is 0).
cudaError_t masked_topk(const TopkPlan& plan, const void* queries, const void* bank,
                        const bool* exclude_mask, const int64_t* exclude_index, void* dists,
                        int64_t* indices, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Batch-order neighbour resolution (contract: docs/design.md, "resolve_neighbours";
// csrc/cpu/resolve_neighbours.cpp is the spec in code).
//
// One block of one warp walks the batch in order (query b depends on the rows 0..b-1 took); the
// taken rows are the hash set of include/resolve_neighbours.h, in shared memory, or in a global
// workspace when the batch is too large for it.

// int64 entries of the workspace for a batch of B queries; 0 when the set fits in shared memory.
int64_t resolve_neighbours_workspace(int64_t B);

// candidates [B, C], index [B], fallback [B, F] or nullptr: int64; uniforms [B]: double when
// uniforms_double, else float. workspace: resolve_neighbours_workspace(B) entries (or nullptr
// when that is 0). Writes picks, taken and status [B] int64. B >= 1.
cudaError_t resolve_neighbours(int64_t B, int64_t C, int64_t F, int64_t k, const int64_t* candidates,
                               const int64_t* index, const void* uniforms, bool uniforms_double,
                               const int64_t* fallback, int64_t* picks, int64_t* taken,
                               int64_t* status, int64_t* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace acn
