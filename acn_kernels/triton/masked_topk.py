"""Triton kernels of the masked top-k neighbour search (docs/design.md, "masked_topk").

Scheme (FAISS's GPU split, with an exact total order):

1. ``_topk_partial_kernel``: program (i, s) takes BLOCK_Q queries and split s of the bank. Per
   tile of BLOCK_N rows it computes the squared distances |q|^2 + |b|^2 - 2 q.b, clamps them at
   +0.0 (FLT_MAX where a finite pair overflowed) and encodes each eligible pair as one int64 key,
   (float bits of the distance) << 32 | row. Distances are >= +0.0, whose bit patterns order like
   the values, so sorting keys orders pairs exactly by (distance, row): ties go to the smaller
   row with no second key. Ineligible pairs (masked, excluded, padding, or a query/row holding
   NaN or inf) get the sentinel key (+inf, 2^32 - 1), which decodes to the padding (+inf, -1).
   The program keeps a sorted running list of the KP = next_pow2(k) smallest keys per query; a
   tile is merged only if one of its keys beats some query's current k-th (the usual shrinking
   threshold): sort the tile, keep its KP smallest (or pad it with sentinels to KP), and merge
   them into the list with a bitonic step (the KP smallest of an ascending a and a descending b
   are min(a_i, b_i), a bitonic sequence that log2(KP) compare-and-swap steps sort).
2. With one split the same program decodes its list into the outputs. With several splits (to
   fill the GPU when B is small) each writes its list to a [B, S, KP] int64 buffer and
   ``_topk_merge_kernel`` merges the S lists per query the same way, then decodes.

q.b is a ``tl.dot`` in full fp32 precision (input_precision="ieee": on GPUs a chain of FMAs per
element, the same for every element, so identical rows get bit-identical distances and tie
exactly). Under TRITON_INTERPRET=1 it is an explicit product-and-sum instead: the interpreter
runs tl.dot as numpy.matmul, whose BLAS kernels can round identical rows differently depending
on their place in the tile, which would break exact ties.

Extra memory: the [B, S, KP] candidate keys, never B x N (S is about 4 x SMs / ceil(B / 16),
so B x S stays below B + 64 x SMs). Rows are addressed with 64-bit offsets; the key keeps 32
bits for the row, so the bank must hold fewer than 2^32 - 1 rows (checked).

Inputs float32/float16/bfloat16, converted to float32 on load; float64 is rejected with a clear
error (the capability table keeps it to "cpu", "cuda" and "torch"). Pairs whose expanded form overflows float32
are recomputed in the direct form (entries above about 1e19 only), so FLT_MAX is reported
exactly where the distance itself overflows.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations, and older
# torch versions need them as objects, not strings.
import torch
import triton
import triton.language as tl

from .. import _testing, registration
from ..checks import check_masked_topk
from ..dispatch import CAPABILITIES
from .launch import SUPPORTED_DTYPES, check_device, device_ctx

# (+inf bits) << 32 | (2^32 - 1): after every eligible key, decodes to (+inf, padding).
_SENTINEL = tl.constexpr(0x7F800000FFFFFFFF)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_MAX_ROWS = CAPABILITIES["triton"].max_bank_rows


@triton.jit
def _compare_swap(x, BQ: tl.constexpr, L: tl.constexpr, J: tl.constexpr, DIR_BIT: tl.constexpr,
                  DESC: tl.constexpr):
    """One bitonic step on [BQ, L]: columns i and i ^ 2^J swap into order. The pair is ascending
    where bit DIR_BIT of i is 0 and descending where it is 1; DIR_BIT < 0 puts every pair in the
    final direction (DESC: 0 ascending, 1 descending). Written with min/max over the size-2 axis
    of a 4-d view: the hypercube trick of tl.sort, whose xor-reductions the interpreter would run
    element by element."""
    S: tl.constexpr = 1 << J
    h = tl.reshape(x, [BQ, L // (2 * S), 2, S])
    lo = tl.expand_dims(tl.min(h, axis=2), 2)
    hi = tl.expand_dims(tl.max(h, axis=2), 2)
    col = tl.reshape(tl.arange(0, L), [1, L // (2 * S), 2, S])
    if DIR_BIT >= 0:
        take_hi = (((col >> J) ^ (col >> DIR_BIT)) & 1) == 1
    else:
        take_hi = ((col >> J) & 1) == 1 - DESC
    return tl.reshape(tl.where(take_hi, hi, lo), [BQ, L])


@triton.jit
def _bitonic_sort(x, BQ: tl.constexpr, L: tl.constexpr, LOG_L: tl.constexpr, DESC: tl.constexpr):
    """Sort each row of the [BQ, L] int64 keys (L = 2^LOG_L), descending if DESC is 1."""
    for stage in tl.static_range(1, LOG_L + 1):
        for jj in tl.static_range(stage):
            if stage < LOG_L:
                x = _compare_swap(x, BQ, L, stage - 1 - jj, stage, DESC)
            else:
                x = _compare_swap(x, BQ, L, stage - 1 - jj, -1, DESC)
    return x


@triton.jit
def _merge_lists(best, cand_desc, BQ: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr):
    """The KP smallest keys of the ascending list ``best`` and the descending list ``cand_desc``,
    ascending: their elementwise minimum holds exactly those keys as a bitonic sequence (rising,
    then falling), which log2(KP) compare-and-swap steps sort."""
    x = tl.minimum(best, cand_desc)
    for jj in tl.static_range(LOG_KP):
        x = _compare_swap(x, BQ, KP, LOG_KP - 1 - jj, -1, 0)
    return x


@triton.jit
def _decode_store(best, rq, qmask, dist_ptr, idx_ptr, k, KP: tl.constexpr):
    """Write the first k keys of each row as (distance, row); the sentinel becomes (+inf, -1)."""
    dist = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    row = best - ((best >> 32) << 32)
    row = tl.where(dist == float("inf"), -1, row)
    col = tl.arange(0, KP)
    off = rq[:, None] * k + col[None, :]
    msk = qmask[:, None] & (col < k)[None, :]
    tl.store(dist_ptr + off, dist, mask=msk)
    tl.store(idx_ptr + off, row, mask=msk)


@triton.jit
def _topk_partial_kernel(
    q_ptr, b_ptr, mask_ptr, exi_ptr, part_ptr, dist_ptr, idx_ptr,
    B, N, D, k, tiles_per_split,
    stride_qb, stride_qd, stride_bn, stride_bd,
    HAS_MASK: tl.constexpr, HAS_EXI: tl.constexpr, FINAL: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    LOG_N: tl.constexpr, LOG_KP: tl.constexpr,
):
    pid_s = tl.program_id(1)
    rq = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    qmask = rq < B
    # Query norms, and whether each query is finite (NaN/inf queries are never paired).
    qn = tl.zeros([BLOCK_Q], dtype=tl.float32)
    qok = qmask
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        m2 = qmask[:, None] & (rd < D)[None, :]
        q = tl.load(q_ptr + rq[:, None] * stride_qb + rd[None, :] * stride_qd, mask=m2, other=0.0)
        q = q.to(tl.float32)
        qn += tl.sum(q * q, axis=1)
        qok = qok & (tl.min((tl.abs(q) < float("inf")).to(tl.int32), axis=1) > 0)
    if HAS_EXI:
        exi = tl.load(exi_ptr + rq, mask=qmask, other=-1)
    best = tl.full([BLOCK_Q, KP], _SENTINEL, tl.int64)
    n0 = pid_s.to(tl.int64) * tiles_per_split * BLOCK_N  # int64: N may exceed 2^31 rows
    for _ in range(0, tiles_per_split):
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n0 += BLOCK_N
        nmask = rn < N
        dot = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        bn = tl.zeros([BLOCK_N], dtype=tl.float32)
        bok = nmask
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            dmask = (rd < D)[None, :]
            q = tl.load(q_ptr + rq[:, None] * stride_qb + rd[None, :] * stride_qd,
                        mask=qmask[:, None] & dmask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rd[None, :] * stride_bd,
                        mask=nmask[:, None] & dmask, other=0.0).to(tl.float32)
            if USE_DOT:
                dot = tl.dot(q, tl.trans(b), dot, input_precision="ieee")
            else:
                dot += tl.sum(q[:, None, :] * b[None, :, :], axis=2)
            bn += tl.sum(b * b, axis=1)
            bok = bok & (tl.min((tl.abs(b) < float("inf")).to(tl.int32), axis=1) > 0)
        d = qn[:, None] + bn[None, :] - 2.0 * dot
        ok = qok[:, None] & bok[None, :]
        # A finite pair whose expanded form overflowed (inf, or inf - inf = NaN): recompute those
        # pairs in the direct form, sum_d (q_d - b_d)^2, which overflows only when the distance
        # itself does. Rare (entries above about 1e19), so a plain loop over the dimensions.
        over = ok & ((d != d) | (d == float("inf")))
        if tl.max(tl.max(over.to(tl.int32), axis=1), axis=0) > 0:
            exact = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
            for dd in range(0, D):
                qd = tl.load(q_ptr + rq * stride_qb + dd * stride_qd, mask=qmask, other=0.0).to(tl.float32)
                bd = tl.load(b_ptr + rn * stride_bn + dd * stride_bd, mask=nmask, other=0.0).to(tl.float32)
                diff = qd[:, None] - bd[None, :]
                exact += diff * diff
            d = tl.where(over, exact, d)
        d = tl.where(d > 0.0, d, 0.0)  # clamp; also turns -0.0 into +0.0
        d = tl.where(d == float("inf"), _FLT_MAX, d)
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + rn, mask=nmask, other=1) == 0)[None, :]
        if HAS_EXI:
            ok = ok & (rn[None, :] != exi[:, None])
        key = (d.to(tl.int32, bitcast=True).to(tl.int64) << 32) | rn[None, :]
        key = tl.where(ok, key, _SENTINEL)
        # Merge only when some key beats its query's current k-th (the list is sorted).
        kth = tl.max(best, axis=1)
        if tl.max((tl.min(key, axis=1) < kth).to(tl.int32), axis=0) > 0:
            # (New names inside the branch: Triton's if needs loop-carried values to keep their type.)
            tile = _bitonic_sort(key, BLOCK_Q, BLOCK_N, LOG_N, 1)
            if BLOCK_N > KP:
                # The KP smallest, descending: the last block of the [BQ, BLOCK_N // KP, KP] view.
                blk = tl.arange(0, BLOCK_N // KP)[None, :, None]
                view = tl.reshape(tile, [BLOCK_Q, BLOCK_N // KP, KP])
                top = tl.min(tl.where(blk == BLOCK_N // KP - 1, view, _SENTINEL), axis=1)
            elif BLOCK_N < KP:
                # Widened to KP, still descending: sentinels, then the tile in the last block.
                blk = tl.arange(0, KP // BLOCK_N)[None, :, None]
                wide = tl.where(blk == KP // BLOCK_N - 1, tile[:, None, :], _SENTINEL)
                top = tl.reshape(wide, [BLOCK_Q, KP])
            else:
                top = tile
            best = _merge_lists(best, top, BLOCK_Q, KP, LOG_KP)
    if FINAL:
        _decode_store(best, rq, qmask, dist_ptr, idx_ptr, k, KP)
    else:
        col = tl.arange(0, KP)
        S = tl.num_programs(1)
        tl.store(part_ptr + (rq[:, None] * S + pid_s) * KP + col[None, :], best, mask=qmask[:, None])


@triton.jit
def _topk_merge_kernel(part_ptr, dist_ptr, idx_ptr, B, S, k,
                       BLOCK_Q: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr):
    rq = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    qmask = rq < B
    col = tl.arange(0, KP)
    best = tl.full([BLOCK_Q, KP], _SENTINEL, tl.int64)
    for s in range(0, S):
        # Loaded back to front: the stored ascending list arrives descending, as the merge wants.
        cand = tl.load(part_ptr + (rq[:, None] * S + s) * KP + (KP - 1 - col)[None, :], mask=qmask[:, None],
                       other=_SENTINEL)
        best = _merge_lists(best, cand, BLOCK_Q, KP, LOG_KP)
    _decode_store(best, rq, qmask, dist_ptr, idx_ptr, k, KP)


# --------------------------------------------------------------------------------------------
# Launcher


def _config(B: int, N: int, D: int, k: int, sms: int | None) -> dict[str, int]:
    """Block sizes, warps, the number of bank splits (plain heuristics, no autotuning) and whether
    q.b is a tl.dot (see the module docstring), for a GPU with ``sms`` multiprocessors, or for the
    interpreter when ``sms`` is None."""
    kp = max(2, triton.next_power_of_2(k))
    block_d = min(64, max(16, triton.next_power_of_2(D)))  # tl.dot needs every dim >= 16
    if sms is None:
        # Few, large programs: the interpreter pays about a millisecond per program.
        block_q = min(64, max(16, triton.next_power_of_2(B)))
        block_n = min(256, max(16, triton.next_power_of_2(N)))
        # Up to 4 splits, so that the CPU tests also run the merge kernel of the GPU path.
        splits = min(4, triton.cdiv(N, block_n))
        return dict(BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, KP=kp, splits=splits, num_warps=4,
                    merge_q=block_q, use_dot=False)
    # Tiles of 16 queries (tl.dot's minimum) by 64 rows, and about 8 list entries per thread
    # (sm_90 ptxas then needs about 145 registers at k <= 64). The tile size does not grow with k:
    # sorting a [16, 1024] tile made the k = 1024 kernel take minutes to compile.
    block_q = 16
    block_n = 64
    num_warps = min(16, block_q * max(block_n, kp) // 128)
    n_tiles = triton.cdiv(N, block_n)
    q_blocks = triton.cdiv(B, block_q)
    # Enough programs to fill the GPU about four times; each split gets whole tiles.
    splits = max(1, min(n_tiles, triton.cdiv(4 * sms, q_blocks)))
    splits = triton.cdiv(n_tiles, triton.cdiv(n_tiles, splits))
    merge_q = max(1, min(32, 4096 // kp))
    return dict(BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, KP=kp, splits=splits,
                num_warps=num_warps, merge_q=merge_q, use_dot=True)


@torch.library.custom_op("acn_kernels::triton_masked_topk", mutates_args=())
def triton_masked_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    exclude_mask: torch.Tensor | None,
    exclude_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked top-k on the GPU (schema of ``acn_kernels::masked_topk`` in csrc/ops.cpp).

    Args:
        queries: [B, D]; bank: [N, D], same dtype (float32, float16 or bfloat16) and device, any
            strides; k: 1 <= k <= min(N, MAX_K); exclude_mask: optional [N] bool (True = skip
            the row); exclude_index: optional [B] int64, the one row query b skips (-1: none;
            the values are not validated here, see :func:`acn_kernels.masked_topk`).

    Returns:
        (dists [B, k] float32, indices [B, k] int64), ascending by (distance, row), padded with
        (+inf, -1) where fewer than k rows are eligible. See the module docstring for the scheme.
    """
    check_masked_topk(queries, bank, k, exclude_mask, exclude_index, values=False)
    if queries.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"queries has dtype {queries.dtype}: the triton backend supports float32, float16 and "
            "bfloat16 (use backend='cpu' or 'torch' for float64)"
        )
    dev = queries.device
    check_device(dev, _topk_partial_kernel)
    B, D = queries.shape
    N = bank.shape[0]
    if N > _MAX_ROWS:
        raise ValueError(f"the triton backend supports banks of at most {_MAX_ROWS} rows, got N={N}")
    dists = _testing.new_output((B, k), torch.float32, dev)
    idx = _testing.new_output((B, k), torch.int64, dev)
    if B == 0:
        return dists, idx
    sms = None if dev.type == "cpu" else torch.cuda.get_device_properties(dev).multi_processor_count
    cfg = _config(B, N, D, k, sms)
    splits, kp = cfg["splits"], cfg["KP"]
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    tiles_per_split = triton.cdiv(n_tiles, splits)
    part = torch.empty((B, splits, kp) if splits > 1 else (0,), dtype=torch.int64, device=dev)
    mask_u8 = exclude_mask.contiguous().view(torch.uint8) if exclude_mask is not None else queries
    exi = exclude_index.contiguous() if exclude_index is not None else queries
    with device_ctx(dev):
        _topk_partial_kernel[(triton.cdiv(B, cfg["BLOCK_Q"]), splits)](
            queries, bank, mask_u8, exi, part, dists, idx,
            B, N, D, k, tiles_per_split,
            queries.stride(0), queries.stride(1), bank.stride(0), bank.stride(1),
            HAS_MASK=exclude_mask is not None, HAS_EXI=exclude_index is not None, FINAL=splits == 1,
            USE_DOT=cfg["use_dot"],
            BLOCK_Q=cfg["BLOCK_Q"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], KP=kp,
            LOG_N=cfg["BLOCK_N"].bit_length() - 1, LOG_KP=kp.bit_length() - 1, num_warps=cfg["num_warps"],
        )
        if splits > 1:
            _topk_merge_kernel[(triton.cdiv(B, cfg["merge_q"]),)](
                part, dists, idx, B, splits, k, BLOCK_Q=cfg["merge_q"], KP=kp, LOG_KP=kp.bit_length() - 1,
                num_warps=4,
            )
    return dists, idx


registration.register_masked_topk("acn_kernels::triton_masked_topk")
