"""Triton kernels of the masked top-k neighbour search (the masked_topk contract: the same rows
and distances as the CPU kernel, csrc/cpu/masked_topk.cpp, on every input).

Scheme. Program (i, s) takes BLOCK_Q queries and split s of the bank (query blocks vary fastest,
so the programs that share a split run together and share its tiles through L2):

1. **Filter on the tensor cores.** Queries and bank rows are shifted by a shared centre c (the
   mean of a sample of finite queries and rows; distances do not change under a shift, and the
   filter's error scales with the shifted norms, so data far from the origin keeps a tight
   band). ``tl.dot`` multiplies the shifted operands on the tensor cores: TF32 for float32
   inputs, bf16 / fp16 (rounded to nearest) for half inputs. The expanded form
   |x|^2 + |y|^2 - 2 <x, y> then only *filters*: a pair is rejected by one comparison,
   ``g - h_b < lim_q``, which is the test of docs/filter-band.md (constants from
   acn_kernels/filter_band.py) divided by -2, so a pair whose direct-form distance is <= the
   query's current k-th distance is never rejected. Rows holding NaN/inf, or so large that the
   test could overflow, always survive (the rescoring drops the non-finite ones).
2. **Survivors are compacted, not sorted.** The surviving (query, row) pairs of a tile, usually
   none, are appended to a per-program queue of W rows per query (a masked scatter at the
   prefix-sum positions; Triton has no shared-memory scatter, so the queue is a small global
   buffer that stays in L1/L2). When a query's queue could overflow, and at the end, the queue
   is *flushed*: its pairs are rescored in the direct form, sum_d (q_d - b_d)^2 in float32 with
   the CPU kernel's summation order (8 lanes over d, a tail, a fixed pairwise sum of the lanes;
   no FMA contraction), so distances are bit-identical to the CPU's and duplicate rows tie
   exactly, and merged WC at a time into the running list.
3. **Running lists in registers.** Each query keeps a sorted list of KP = next_pow2(k) int64
   keys (float bits of the distance) << 32 | row; distances are >= +0.0, so integer order is
   (distance, row) order and ties go to the smaller row. A block of candidates is merged by a
   bitonic merge (the KP smallest of an ascending and a descending list are their elementwise
   minimum, a bitonic sequence). The threshold ``lim_q`` comes from the k-th key. BLOCK_Q
   shrinks as k grows (64 queries up to k = 128, 8 at k = 1024, with the dot padded to 16
   rows) so that the lists stay in registers: no spills on sm_90 (checked by the tests).
4. **Merge of the per-split lists** by a tree of launches, each merging up to FAN_IN lists per
   query, so that B = 1 against a large bank (hundreds of splits) never serialises on one
   program; the last level decodes keys into (distance, row), the sentinel into (+inf, -1).

Contract rules: pairs with a NaN/inf query or row, masked or excluded rows are never returned;
a finite pair whose distance overflows gets FLT_MAX; distances are >= +0.0; the tail is padded
with (+inf, -1). All offsets into strided inputs are int64 (every index and stride is widened
before it is multiplied); non-contiguous inputs are read in place. The
key keeps 32 bits for the row, so the bank must hold fewer than 2^32 - 1 rows (checked).

Extra memory: the [B, S, KP] int64 partial lists and the [S * blocks, BLOCK_M, W] int32 queue,
never B x N (S is about 2 x SMs / blocks, so B x S stays near max(B, 2 x SMs x BLOCK_Q)).
Estimated GPU performance against the issue's goals: BENCHMARKS.md.

Inputs float32/float16/bfloat16; float64 is rejected with a clear error (the capability table
keeps it to "cpu", "cuda" and "torch"). Under TRITON_INTERPRET=1 the dot runs on float32
operands holding the rounded values (the interpreter cannot multiply bf16; TF32 by explicit
truncation, the worst case), i.e. the same operand rounding with a float32 accumulator.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations, and older
# torch versions need them as objects, not strings.
import torch
import triton
import triton.language as tl

from .. import _testing, filter_band, registration
from ..checks import check_masked_topk
from ..dispatch import CAPABILITIES
from .launch import SUPPORTED_DTYPES, check_device, device_ctx

# (+inf bits) << 32 | (2^32 - 1): after every eligible key, decodes to (+inf, padding).
_SENTINEL = tl.constexpr(0x7F800000FFFFFFFF)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
# A row or query is filtered only below this squared norm: every quantity of the test stays finite.
_SAFE_NORM = tl.constexpr(2.0**120)
_FP16_MAX = tl.constexpr(filter_band.FP16_MAX)
_MAX_ROWS = CAPABILITIES["triton"].max_bank_rows
# Operand rounding of the matrix unit per input dtype: (MMA code of the kernel, filter_band inputs).
_MMA = {torch.float32: (0, "tf32"), torch.bfloat16: (1, "bf16"), torch.float16: (2, "fp16")}
_CENTRE_SAMPLE = 1024  # rows of the queries and of the bank that the centre is the mean of


# --------------------------------------------------------------------------------------------
# Sorting network helpers (int64 keys, [BQ, L] with L a power of two)


@triton.jit
def _compare_swap(x, BQ: tl.constexpr, L: tl.constexpr, J: tl.constexpr, DIR_BIT: tl.constexpr,
                  DESC: tl.constexpr):
    """One bitonic step on [BQ, L]: columns i and i ^ 2^J swap into order. The pair is ascending
    where bit DIR_BIT of i is 0 and descending where it is 1; DIR_BIT < 0 puts every pair in the
    final direction (DESC: 0 ascending, 1 descending). Written with min/max over the size-2 axis
    of a 4-d view (the hypercube trick of tl.sort, without its xor-reductions, which the
    interpreter would run element by element; a tl.split / tl.join form makes Triton's layout
    pass run for minutes)."""
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
def _bitonic(x, BQ: tl.constexpr, L: tl.constexpr, LOG_L: tl.constexpr, FIRST: tl.constexpr, DESC: tl.constexpr):
    """Stages FIRST..LOG_L of a bitonic sort of each row of the [BQ, L] int64 keys (L = 2^LOG_L):
    FIRST = 1 sorts, FIRST = LOG_L sorts a bitonic sequence (a merge); DESC 1 sorts descending."""
    for stage in tl.static_range(FIRST, LOG_L + 1):
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
    then falling), which the last stage of a bitonic sort (log2(KP) steps) sorts."""
    return _bitonic(tl.minimum(best, cand_desc), BQ, KP, LOG_KP, LOG_KP, 0)


@triton.jit
def _merge_block(best, key, BQ: tl.constexpr, WC: tl.constexpr, LOG_WC: tl.constexpr, KP: tl.constexpr,
                 LOG_KP: tl.constexpr):
    """Merge the unsorted [BQ, WC] candidate keys into the sorted [BQ, KP] list."""
    tile = _bitonic(key, BQ, WC, LOG_WC, 1, 1)
    if WC > KP:
        # The KP smallest, descending: the last block of the [BQ, WC // KP, KP] view.
        blk = tl.arange(0, WC // KP)[None, :, None]
        view = tl.reshape(tile, [BQ, WC // KP, KP])
        top = tl.min(tl.where(blk == WC // KP - 1, view, _SENTINEL), axis=1)
    elif WC < KP:
        # Widened to KP, still descending: sentinels, then the candidates in the last block.
        blk = tl.arange(0, KP // WC)[None, :, None]
        top = tl.reshape(tl.where(blk == KP // WC - 1, tile[:, None, :], _SENTINEL), [BQ, KP])
    else:
        top = tile
    return _merge_lists(best, top, BQ, KP, LOG_KP)


@triton.jit
def _kth_key(best, k, KP: tl.constexpr):
    """Column k - 1 of the sorted [BQ, KP] list: the current k-th key of each query."""
    col = tl.arange(0, KP)
    return tl.sum(best * (col[None, :] == k - 1).to(tl.int64), axis=1)


@triton.jit
def _to_rows(v, BQ: tl.constexpr, BM: tl.constexpr, FILL: tl.constexpr):
    """A [BQ] per-query vector as the [BM] per-row vector of the dot (BM a multiple of BQ; the
    padding rows get FILL)."""
    if BM == BQ:
        r = v
    else:
        r = tl.reshape(tl.where(tl.arange(0, BM // BQ)[:, None] == 0, v[None, :], FILL), [BM])
    return r


@triton.jit
def _to_list(v, BQ: tl.constexpr, BM: tl.constexpr):
    """The [BM] per-row int32 vector v as a [BQ] per-query one (padding rows hold 0)."""
    if BM == BQ:
        r = v
    else:
        r = tl.sum(tl.reshape(v, [BM // BQ, BQ]), axis=0)
    return r


# --------------------------------------------------------------------------------------------
# Arithmetic helpers


@triton.jit
def _operand(x, MMA: tl.constexpr, FP32_OPERANDS: tl.constexpr):
    """The matrix unit's operand for the float32 values x: float32 for TF32 (MMA 0; the tensor
    core drops the low 13 mantissa bits or rounds them, both inside the band), bf16 (1) or fp16
    (2) rounded to nearest. FP32_OPERANDS (interpreter): the rounded values in float32, TF32 by
    explicit truncation, the worst case."""
    if MMA == 0:
        if FP32_OPERANDS:
            r = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 0xFFFFE000
        else:
            r = x
    else:
        if MMA == 1:
            r = x.to(tl.bfloat16)
        else:
            r = x.to(tl.float16)
        if FP32_OPERANDS:
            r = r.to(tl.float32)
    return r


@triton.jit
def _mma(a, b, acc, MMA: tl.constexpr, FP32_OPERANDS: tl.constexpr):
    """acc + a @ b on the tensor cores: TF32 for float32 operands, bf16/fp16 as they are."""
    if MMA == 0 and not FP32_OPERANDS:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif FP32_OPERANDS:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _limit(kth, nx, l1x, qstate, alpha, beta, eta, gamma0):
    """lim_q of the filter test ``g - h_b < lim_q`` from the k-th key (docs/filter-band.md):
    -(tau (1 + alpha) + (beta - 1) nx + eta l1x + abs) / 2; -FLT_MAX while the list is not full
    (every eligible row survives), +inf for a query that is not finite (qstate 1: nothing
    survives), -inf for one whose filter values may overflow (qstate 2: everything survives)."""
    tau = (kth >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    lim = -(tau * (1.0 + alpha) + (beta - 1.0) * nx + eta * l1x + gamma0) * 0.5
    lim = tl.where(tau == float("inf"), -_FLT_MAX, lim)
    lim = tl.where(qstate == 2, float("-inf"), lim)
    return tl.where(qstate == 1, float("inf"), lim)


@triton.jit
def _lanes8(x, BQ: tl.constexpr, WC: tl.constexpr):
    """The 8 lanes of a [BQ, WC, 8] tensor as eight [BQ, WC] tensors, lane 0 first: three tl.split
    levels (even/odd lanes)."""
    x02, x13 = tl.split(tl.reshape(x, [BQ, WC, 4, 2]))
    x04, x26 = tl.split(tl.reshape(x02, [BQ, WC, 2, 2]))
    x15, x37 = tl.split(tl.reshape(x13, [BQ, WC, 2, 2]))
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _direct_dist(q_ptr, b_ptr, rq, qmask, rows, valid, D, stride_qb, stride_qd, stride_bn, stride_bd,
                 BQ: tl.constexpr, WC: tl.constexpr):
    """[BQ, WC] direct-form distances sum_d (q_d - b_d)^2 of query rq[i] and bank row rows[i, j]
    in float32, in the CPU kernel's order (csrc/cpu/masked_topk.cpp, exact_dist): lane l sums
    d = l, l + 8, ... sequentially over the whole groups of 8, a tail sums the rest in order, and
    the result is ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7)) + tail, written out (the
    kernel is compiled without FMA contraction). Overflow maps to FLT_MAX; a row holding NaN or
    inf gives NaN."""
    lane = tl.arange(0, 8)
    qb = (rq * stride_qb)[:, None, None]
    bb = (rows * stride_bn)[:, :, None]
    qm = qmask[:, None, None]
    vm = valid[:, :, None]
    s = tl.zeros([BQ, WC, 8], dtype=tl.float32)
    for d0 in range(0, D - 7, 8):
        dd = (d0 + lane).to(tl.int64)[None, None, :]
        qv = tl.load(q_ptr + qb + dd * stride_qd, mask=qm, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + bb + dd * stride_bd, mask=vm, other=0.0).to(tl.float32)
        t = qv - bv
        s += t * t + (bv - bv)  # + 0.0 (no change) for a finite entry, NaN otherwise
    # The tail (D % 8 < 8 dimensions) as one masked 8-wide load; its lanes are added in order
    # (masked lanes add +0.0, which changes nothing).
    dd = (D - D % 8 + lane).to(tl.int64)[None, None, :]
    tm = (lane < D % 8)[None, None, :]
    qv = tl.load(q_ptr + qb + dd * stride_qd, mask=qm & tm, other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + bb + dd * stride_bd, mask=vm & tm, other=0.0).to(tl.float32)
    t = qv - bv
    t = t * t + (bv - bv)
    t0, t1, t2, t3, t4, t5, t6, t7 = _lanes8(t, BQ, WC)
    tail = ((((((t0 + t1) + t2) + t3) + t4) + t5) + t6) + t7
    s0, s1, s2, s3, s4, s5, s6, s7 = _lanes8(s, BQ, WC)
    dist = (((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))) + tail
    return tl.where(dist == float("inf"), _FLT_MAX, dist)


@triton.jit
def _flush(best, queue, qcnt, row0, q_ptr, b_ptr, rq, qmask, D, stride_qb, stride_qd, stride_bn, stride_bd,
           BQ: tl.constexpr, W: tl.constexpr, WC: tl.constexpr, LOG_WC: tl.constexpr, KP: tl.constexpr,
           LOG_KP: tl.constexpr):
    """Rescore the queued rows of every query (qcnt[i] of them at queue + i * W, as offsets from
    row0) in the direct form and merge them into the running list ``best``."""
    tl.debug_barrier()  # the queue's stores by other threads are visible from here
    most = tl.max(qcnt, axis=0)
    for w0 in range(0, most, WC):
        slot = w0 + tl.arange(0, WC)
        valid = slot[None, :] < qcnt[:, None]
        rows = row0 + tl.load(queue + tl.arange(0, BQ)[:, None] * W + slot[None, :], mask=valid, other=0,
                              cache_modifier=".cg").to(tl.int64)
        dist = _direct_dist(q_ptr, b_ptr, rq, qmask, rows, valid, D, stride_qb, stride_qd, stride_bn,
                            stride_bd, BQ, WC)
        key = (dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | rows
        # A row that is not finite (NaN distance) pairs with nothing.
        best = _merge_block(best, tl.where(valid & (dist == dist), key, _SENTINEL), BQ, WC, LOG_WC, KP, LOG_KP)
    tl.debug_barrier()  # every thread has read the queue before it is written again
    return best


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


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _topk_search_kernel(
    q_ptr, b_ptr, c_ptr, mask_ptr, exi_ptr, queue_ptr, part_ptr, dist_ptr, idx_ptr,
    B, N, D, k, tiles_per_split,
    stride_qb, stride_qd, stride_bn, stride_bd,
    alpha, beta, eta, gamma0,
    HAS_MASK: tl.constexpr, HAS_EXI: tl.constexpr, FINAL: tl.constexpr, MMA: tl.constexpr,
    FP32_OPERANDS: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    LOG_KP: tl.constexpr, W: tl.constexpr, WC: tl.constexpr, LOG_WC: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    # BLOCK_Q queries; the dot takes BLOCK_M = max(BLOCK_Q, 16) rows (tl.dot's minimum), the
    # rows past BLOCK_Q padding that never survives. Per-row vectors have BLOCK_M entries, the
    # lists and the flush BLOCK_Q.
    rm = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_M).to(tl.int64)
    mmask = (rm < B) & (tl.arange(0, BLOCK_M) < BLOCK_Q)
    rq = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    qmask = rq < B
    rd0 = tl.arange(0, BLOCK_D)

    # Per query: shifted norms, finiteness and the filter's safety (qstate 0 ok, 1 not finite or
    # padding, 2 may overflow the test), and the shifted operand when D fits one chunk.
    nx = tl.zeros([BLOCK_M], dtype=tl.float32)
    l1x = tl.zeros([BLOCK_M], dtype=tl.float32)
    mxx = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + rd0
        dm = rd < D
        q = tl.load(q_ptr + rm[:, None] * stride_qb + rd[None, :].to(tl.int64) * stride_qd,
                    mask=mmask[:, None] & dm[None, :], other=0.0).to(tl.float32)
        cen = tl.load(c_ptr + rd, mask=dm, other=0.0)
        x = tl.where(tl.abs(q) < float("inf"), q - cen[None, :], 0.0)
        nx += tl.sum(x * x + (q - q), axis=1)  # NaN for a query that is not finite (see the tile)
        l1x += tl.sum(tl.abs(x), axis=1)
        if MMA == 2:
            mxx = tl.maximum(mxx, tl.max(tl.abs(x), axis=1))
    qfin = mmask & (nx == nx)
    qunsafe = nx >= _SAFE_NORM
    if MMA == 2:
        qunsafe = qunsafe | (mxx > _FP16_MAX)
    qstate = tl.where(qfin, tl.where(qunsafe, 2, 0), 1)
    if ONE_CHUNK:
        q = tl.load(q_ptr + rm[:, None] * stride_qb + rd0[None, :].to(tl.int64) * stride_qd,
                    mask=mmask[:, None] & (rd0 < D)[None, :], other=0.0).to(tl.float32)
        cen = tl.load(c_ptr + rd0, mask=rd0 < D, other=0.0)
        xop = _operand(tl.where(qfin[:, None], q - cen[None, :], 0.0), MMA, FP32_OPERANDS)
    if HAS_EXI:
        exi = tl.load(exi_ptr + rm, mask=mmask, other=-1)
    else:
        exi = tl.full([BLOCK_M], -1, tl.int64)

    best = tl.full([BLOCK_Q, KP], _SENTINEL, tl.int64)
    lim = _limit(_to_rows(_kth_key(best, k, KP), BLOCK_Q, BLOCK_M, _SENTINEL), nx, l1x, qstate, alpha, beta, eta,
                 gamma0)
    qcnt = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_blocks = tl.num_programs(0)
    # This program's queue: BLOCK_M x W row offsets (int32, from the split's first row).
    queue = queue_ptr + (pid_s.to(tl.int64) * n_blocks + pid_q) * (BLOCK_M * W)
    row0 = pid_s.to(tl.int64) * tiles_per_split * BLOCK_N  # int64: N may exceed 2^31 rows
    n_end = tl.minimum(row0 + tiles_per_split * BLOCK_N, N)
    n0 = row0
    # The excluded row as an offset into this split (-1: none here), compared in int32.
    exi32 = tl.where((exi >= row0) & (exi < n_end), exi - row0, -1).to(tl.int32)
    # One iteration more than the split has tiles: the last one holds no rows and flushes the
    # queue, so the flush is compiled once.
    for t in range(0, tiles_per_split + 1):
        last = t == tiles_per_split
        rn32 = (n0 - row0).to(tl.int32) + tl.arange(0, BLOCK_N)  # a split holds < 2^31 rows (launcher)
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n0 += BLOCK_N
        nmask = rn < n_end
        if HAS_MASK:
            live = nmask & (tl.load(mask_ptr + rn, mask=nmask, other=1) == 0)
        else:
            live = nmask
        # The tile: shifted rows (non-finite entries zeroed, so the products stay finite), their
        # norms, finiteness and safety, and g = <x~, y~> on the tensor cores.
        ny = tl.zeros([BLOCK_N], dtype=tl.float32)
        l1y = tl.zeros([BLOCK_N], dtype=tl.float32)
        mxy = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for e0 in tl.range(0, D, BLOCK_D, num_stages=1):
            re = e0 + rd0
            em = re < D
            bv = tl.load(b_ptr + rn[:, None] * stride_bn + re[None, :].to(tl.int64) * stride_bd,
                         mask=live[:, None] & em[None, :], other=0.0).to(tl.float32)
            ce = tl.load(c_ptr + re, mask=em, other=0.0)
            # Non-finite entries are not zeroed: they only spoil their own column of the dot, and
            # such a row has ny = NaN or inf, so it always survives and the rescoring drops it.
            y = bv - ce[None, :]
            ny += tl.sum(y * y, axis=1)
            l1y += tl.sum(tl.abs(y), axis=1)
            if MMA == 2:
                mxy = tl.maximum(mxy, tl.max(tl.abs(y), axis=1))
            if not ONE_CHUNK:
                qv = tl.load(q_ptr + rm[:, None] * stride_qb + re[None, :].to(tl.int64) * stride_qd,
                             mask=mmask[:, None] & em[None, :], other=0.0).to(tl.float32)
                xop = _operand(tl.where(qfin[:, None], qv - ce[None, :], 0.0), MMA, FP32_OPERANDS)
            acc = _mma(xop, tl.trans(_operand(y, MMA, FP32_OPERANDS)), acc, MMA, FP32_OPERANDS)
        # h_b: +inf for a masked row (never survives), -inf for one the test may not judge
        # (huge or non-finite: always survives).
        safe = ny < _SAFE_NORM  # False for NaN
        if MMA == 2:
            safe = safe & (mxy <= _FP16_MAX)
        h = tl.where(safe, (ny * (1.0 - beta) - eta * l1y) * 0.5, float("-inf"))
        h = tl.where(live, h, float("inf"))
        # The filter: one comparison per pair; NaN never rejects.
        sv = ((acc - h[None, :]) < lim[:, None]) == 0
        if (tl.max(sv.to(tl.int32)) > 0) | last:
            sv = sv & live[None, :] & qfin[:, None] & (rn32[None, :] != exi32[:, None])
            cnt = tl.sum(sv.to(tl.int32), axis=1)
            if (tl.max(qcnt + cnt, axis=0) > W) | last:
                best = _flush(best, queue, _to_list(qcnt, BLOCK_Q, BLOCK_M), row0, q_ptr, b_ptr, rq, qmask, D,
                              stride_qb, stride_qd, stride_bn, stride_bd, BLOCK_Q, W, WC, LOG_WC, KP, LOG_KP)
                qcnt = tl.zeros([BLOCK_M], dtype=tl.int32)
                lim = _limit(_to_rows(_kth_key(best, k, KP), BLOCK_Q, BLOCK_M, _SENTINEL), nx, l1x, qstate, alpha,
                             beta, eta, gamma0)
            # Compaction: survivor j of query i goes to queue slot qcnt[i] + (rank of j). (The
            # tile's survivors of the old threshold, after a flush: the new one is not rechecked.)
            dest = tl.arange(0, BLOCK_M)[:, None] * W + qcnt[:, None] + tl.cumsum(sv.to(tl.int32), axis=1) - 1
            tl.store(queue + dest, tl.broadcast_to(rn32[None, :], [BLOCK_M, BLOCK_N]), mask=sv)
            qcnt += cnt
    if FINAL:
        _decode_store(best, rq, qmask, dist_ptr, idx_ptr, k, KP)
    else:
        col = tl.arange(0, KP)
        S = tl.num_programs(1)
        tl.store(part_ptr + (rq[:, None] * S + pid_s) * KP + col[None, :], best, mask=qmask[:, None])


@triton.jit
def _topk_merge_kernel(part_ptr, out_ptr, dist_ptr, idx_ptr, B, S, k,
                       FAN_IN: tl.constexpr, FINAL: tl.constexpr, BLOCK_Q: tl.constexpr, KP: tl.constexpr,
                       LOG_KP: tl.constexpr):
    """One level of the merge tree: program (i, g) merges lists g * FAN_IN ... of the [B, S, KP]
    partial lists of BLOCK_Q queries into list g of [B, ceil(S / FAN_IN), KP], or decodes it."""
    rq = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    g = tl.program_id(1)
    qmask = rq < B
    col = tl.arange(0, KP)
    best = tl.full([BLOCK_Q, KP], _SENTINEL, tl.int64)
    for s in range(g * FAN_IN, tl.minimum(S, g * FAN_IN + FAN_IN)):
        # Loaded back to front: the stored ascending list arrives descending, as the merge wants.
        cand = tl.load(part_ptr + (rq[:, None] * S + s) * KP + (KP - 1 - col)[None, :], mask=qmask[:, None],
                       other=_SENTINEL)
        best = _merge_lists(best, cand, BLOCK_Q, KP, LOG_KP)
    if FINAL:
        _decode_store(best, rq, qmask, dist_ptr, idx_ptr, k, KP)
    else:
        s_out = tl.num_programs(1)
        tl.store(out_ptr + (rq[:, None] * s_out + g) * KP + col[None, :], best, mask=qmask[:, None])


# --------------------------------------------------------------------------------------------
# Launcher


def _config(B: int, N: int, D: int, k: int, sms: int | None, contiguous: bool = True) -> dict[str, int]:
    """Launch configuration (plain heuristics, no autotuning) for a GPU with ``sms``
    multiprocessors, or for the interpreter when ``sms`` is None: block sizes, warps, the queue
    (W slots per query, flushed WC at a time), the number of bank splits and the merge tree's
    fan-in. ``contiguous``: rows of both inputs have unit stride (else smaller blocks: the
    strided loads need more registers). ``grid`` is the search kernel's grid (query blocks,
    splits)."""
    kp = max(2, triton.next_power_of_2(k))
    if sms is None:
        # Few, large programs: the interpreter pays about a millisecond per program and per op.
        block_q = min(64, max(16, triton.next_power_of_2(B)), max(16, 16384 // kp))
        block_n = min(128, max(16, triton.next_power_of_2(N)))
        num_warps, fan_in, max_splits = 4, 2, 4  # small fan-in: the CPU tests run a merge tree too
    else:
        # Register budget (checked without spills for sm_90 by tests/test_triton.py): with D in
        # one chunk 64 queries up to k = 128, 16 up to k = 256 and 8 above (the dot still takes
        # 16 rows); with several chunks (D > 64, or strided rows) 32 up to k = 128, then 8.
        one = D <= 64 and contiguous
        block_q = (64 if one else 32) if kp <= 128 else 16 if kp <= 256 and one else 8
        block_n = 64
        num_warps = 8
        fan_in, max_splits = 8, None
    w = block_n  # a flushed queue always takes a whole tile
    # Queue slots rescored per step: [BLOCK_Q, WC, 8] values (registers); the whole queue at once
    # under the interpreter (fewer, larger steps).
    wc = w if sms is None else min(w, max(4, 256 // block_q))
    # One chunk of D (the query operand stays in registers) up to 64 for contiguous rows
    # (interpreter: 128), else chunks of 32 (interpreter: 64).
    one_max, chunk = (128, 64) if sms is None else (64 if contiguous else 0, 32)
    block_d = max(16, triton.next_power_of_2(D)) if D <= one_max else chunk
    n_tiles = max(1, triton.cdiv(N, block_n))
    q_blocks = triton.cdiv(B, block_q)
    # Enough programs for two per multiprocessor (query blocks x splits), whole tiles per split.
    want = (2 * sms + q_blocks - 1) // q_blocks if sms is not None else max_splits
    # (A split holds fewer than 2^31 rows: the queue keeps int32 offsets.)
    tiles_per_split = min(max(1, n_tiles // max(1, want)), (2**31 - 1) // block_n)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    return dict(BLOCK_Q=block_q, BLOCK_M=max(16, block_q), BLOCK_N=block_n, BLOCK_D=block_d, KP=kp, W=w, WC=wc,
                num_warps=num_warps, splits=splits, tiles_per_split=tiles_per_split, fan_in=fan_in,
                merge_q=max(1, min(32, 4096 // kp)), grid=(q_blocks, splits), one_chunk=D <= one_max)


def _merge_levels(B: int, cfg: dict) -> list[tuple[tuple[int, int], int, int]]:
    """The merge tree of the per-split lists: (grid, lists in, lists out) per launch. Each
    program merges at most FAN_IN lists of BLOCK_Q queries, so the work spreads over
    B / merge_q x splits / FAN_IN programs at the first level (B = 1 does not serialise)."""
    levels, s = [], cfg["splits"]
    while s > 1:
        s_out = triton.cdiv(s, cfg["fan_in"])
        levels.append(((triton.cdiv(B, cfg["merge_q"]), s_out), s, s_out))
        s = s_out
    return levels


def _centre(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """[D] float32: the mean of up to _CENTRE_SAMPLE evenly spaced finite rows of the queries and
    of the bank, in float64 (any finite shift is correct; one near the data keeps the band tight)."""
    parts = []
    for x in (queries, bank):
        steps = min(x.shape[0], _CENTRE_SAMPLE)
        idx = torch.linspace(0, x.shape[0] - 1, steps, dtype=torch.float64, device=x.device).long()
        parts.append(x[idx].double())
    rows = torch.cat(parts)
    fin = torch.isfinite(rows).all(1, keepdim=True)
    total = torch.where(fin, rows, 0.0).sum(0)
    return (total / fin.sum().clamp_min(1)).float()


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
    check_device(dev, _topk_search_kernel)
    B, D = queries.shape
    N = bank.shape[0]
    if N > _MAX_ROWS:
        raise ValueError(f"the triton backend supports banks of at most {_MAX_ROWS} rows, got N={N}")
    dists = _testing.new_output((B, k), torch.float32, dev)
    idx = _testing.new_output((B, k), torch.int64, dev)
    if B == 0:
        return dists, idx
    interpret = dev.type == "cpu"
    sms = None if interpret else torch.cuda.get_device_properties(dev).multi_processor_count
    contiguous = queries.stride(1) == 1 and bank.stride(1) == 1
    cfg = _config(B, N, D, k, sms, contiguous)
    mma, inputs = _MMA[queries.dtype]
    band = filter_band.filter_band(D, inputs, centred=True)
    kp, splits = cfg["KP"], cfg["splits"]
    q_blocks = cfg["grid"][0]
    log2 = int.bit_length
    centre = _centre(queries, bank)
    queue = torch.empty(splits * q_blocks * cfg["BLOCK_M"] * cfg["W"], dtype=torch.int32, device=dev)
    part = torch.empty((B, splits, kp) if splits > 1 else (0,), dtype=torch.int64, device=dev)
    mask_u8 = exclude_mask.contiguous().view(torch.uint8) if exclude_mask is not None else queries
    exi = exclude_index.contiguous() if exclude_index is not None else queries
    with device_ctx(dev):
        _topk_search_kernel[cfg["grid"]](
            queries, bank, centre, mask_u8, exi, queue, part, dists, idx,
            B, N, D, k, cfg["tiles_per_split"],
            queries.stride(0), queries.stride(1), bank.stride(0), bank.stride(1),
            band.alpha, band.beta, band.eta, band.abs,
            HAS_MASK=exclude_mask is not None, HAS_EXI=exclude_index is not None, FINAL=splits == 1, MMA=mma,
            FP32_OPERANDS=interpret, ONE_CHUNK=cfg["one_chunk"],
            BLOCK_Q=cfg["BLOCK_Q"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], KP=kp,
            LOG_KP=log2(kp) - 1,
            W=cfg["W"], WC=cfg["WC"], LOG_WC=log2(cfg["WC"]) - 1,
            num_warps=cfg["num_warps"], enable_fp_fusion=False,
        )
        for grid, s_in, s_out in _merge_levels(B, cfg):
            out = torch.empty((B, s_out, kp) if s_out > 1 else (0,), dtype=torch.int64, device=dev)
            _topk_merge_kernel[grid](
                part, out, dists, idx, B, s_in, k, FAN_IN=cfg["fan_in"], FINAL=s_out == 1, BLOCK_Q=cfg["merge_q"],
                KP=kp, LOG_KP=log2(kp) - 1, num_warps=4,
            )
            part = out
    return dists, idx


registration.register_masked_topk("acn_kernels::triton_masked_topk")
