"""Triton kernels of the mixture log-likelihood (forward, backward) and of the ACN KL on top of it
(the posterior q = N(code, I), or N(code, diag(exp(2 posterior_log_scale))) with its log-scale).

The math is csrc/include/acn_math.h, written once more in Triton: for element (b, d) and component m

    s = max_m logit_m (0 if infinite),   l_m = logit_m - s,
    t_m = l_m - log_s_m - 0.5 log(2 pi) - 0.5 u^2,   u = (z - mu_m) * exp(-log_s_m)
    T = logsumexp_m t_m,   Lz = logsumexp_m l_m,    log p(z_d) = T - Lz,

with ``lse[b, d] = (T, Lz)`` saved for the backward, which takes s again and recomputes the
responsibilities r_m = exp(t_m - T) and weights w_m = exp(l_m - Lz) from the inputs (docs/design.md,
"mixture_log_prob and acn_kl").
The shift s comes first so that T - Lz does not cancel at large logits (T and Lz are then of the
size of log p and log M, not of the logits). The KL's log q per dimension is acn::gaussian_log_prob,
(-0.5 v^2 - 0.5 log(2 pi)) - s_q with v = (z - code) * exp(-s_q), and its gradients
acn::gaussian_grads, in the same pass as the mixture's; without a log-scale the kernels compile
the unit posterior (s_q = 0) as it always was.

Work split: a program owns a [BLOCK_B, BLOCK_D] tile of elements and walks the components in
chunks of BLOCK_M with an online (max-subtracted) log-sum-exp, so any M runs in fixed registers.
With ``per_dim=False`` a program walks every dimension of its rows and sums them itself, so the
row sum is deterministic and needs no atomics. Block sizes are plain heuristics of (D, M) (no
autotuning: the interpreter cannot run several configs), larger under TRITON_INTERPRET=1, where
each program costs about a millisecond of Python.

Dtypes: float32, float16 and bfloat16 inputs, loaded and converted to float32 before any
arithmetic; the result and ``lse`` are float32, gradients come back in the input dtype. float64
is rejected with a clear error (the capability table keeps float64 to "cpu", "cuda" and "torch").
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations, and older
# torch versions need them as objects, not strings.
import torch
import triton
import triton.language as tl

from .. import _testing, registration
from ..checks import check_mixture
from .launch import SUPPORTED_DTYPES, check_device, device_ctx

_HALF_LOG_2PI = tl.constexpr(0.918938533204672741780329736406)


@triton.jit
def _lse_shift(mx):
    # The maximum, or 0 where it is infinite (acn::lse_shift): all terms -inf would otherwise give
    # exp(-inf - -inf) = NaN, and +inf terms then give an infinite sum, the right limit.
    return tl.where((mx == float("inf")) | (mx == float("-inf")), 0.0, mx)


@triton.jit
def _lse_merge(mx, s, x):
    """Merge the chunk x [BB, BD, BM] into the running (max, sum of exp(. - shift)) per element."""
    new_mx = tl.maximum(mx, tl.max(x, axis=2))
    shift = _lse_shift(new_mx)
    # s == 0 means no finite term yet: skip the rescale, whose factor may overflow.
    s = tl.where(s == 0.0, 0.0, s * tl.exp(_lse_shift(mx) - shift))
    s += tl.sum(tl.exp(x - shift[:, :, None]), axis=2)
    return new_mx, s


@triton.jit
def _logit_shift(lg_ptr, e, emask, M, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """lse_shift of the logits' maximum over all M components, [BB, BD] (acn_math.h)."""
    mx = tl.full([BLOCK_B, BLOCK_D], float("-inf"), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        msk = emask[:, :, None] & (rm < M)[None, None, :]
        logit = tl.load(lg_ptr + e[:, :, None] * M + rm[None, None, :], mask=msk, other=float("-inf"))
        mx = tl.maximum(mx, tl.max(logit.to(tl.float32), axis=2))
    return _lse_shift(mx)


@triton.jit
def _lse_finish(mx, s):
    # log(0) = -inf written out, so that the interpreter (numpy) does not warn about it.
    return tl.where(s == 0.0, float("-inf"), _lse_shift(mx) + tl.log(tl.where(s == 0.0, 1.0, s)))


@triton.jit
def _mixture_fwd_kernel(
    z_ptr, lg_ptr, mu_ptr, ls_ptr, code_ptr, pls_ptr, out_ptr, lse_ptr,
    B, D, M, d_per_prog,
    HAS_CODE: tl.constexpr, HAS_SCALE: tl.constexpr, PER_DIM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rb = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    bmask = rb < B
    d_start = tl.program_id(1) * d_per_prog
    row = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(d_start, d_start + d_per_prog, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        emask = bmask[:, None] & (rd < D)[None, :]
        e = rb[:, None] * D + rd[None, :]  # int64 element offsets [BB, BD]
        zz = tl.load(z_ptr + e, mask=emask, other=0.0).to(tl.float32)
        sh = _logit_shift(lg_ptr, e, emask, M, BLOCK_B, BLOCK_D, BLOCK_M)[:, :, None]
        mx_t = tl.full([BLOCK_B, BLOCK_D], float("-inf"), tl.float32)
        s_l = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        s_t = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            i = e[:, :, None] * M + rm[None, None, :]
            msk = emask[:, :, None] & (rm < M)[None, None, :]
            # Padding components get logit -inf, hence a -inf term: they add nothing to either sum.
            lgs = tl.load(lg_ptr + i, mask=msk, other=float("-inf")).to(tl.float32) - sh
            mu = tl.load(mu_ptr + i, mask=msk, other=0.0).to(tl.float32)
            log_s = tl.load(ls_ptr + i, mask=msk, other=0.0).to(tl.float32)
            # (z - mu) * exp(-log_s), not a division: a tiny sigma overflows u to inf and the
            # term to -inf, the exact limit (acn::joint_term).
            u = (zz[:, :, None] - mu) * tl.exp(-log_s)
            t = lgs - log_s - _HALF_LOG_2PI - 0.5 * u * u
            s_l += tl.sum(tl.exp(lgs), axis=2)  # exp(l) <= 1 (finite maximum): no running max
            mx_t, s_t = _lse_merge(mx_t, s_t, t)
        big_t = _lse_finish(mx_t, s_t)
        lz = _lse_finish(tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32), s_l)
        tl.store(lse_ptr + 2 * e, big_t, mask=emask)
        tl.store(lse_ptr + 2 * e + 1, lz, mask=emask)
        v = big_t - lz
        if HAS_CODE:
            ec = zz - tl.load(code_ptr + e, mask=emask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                lsq = tl.load(pls_ptr + e, mask=emask, other=0.0).to(tl.float32)
                vq = ec * tl.exp(-lsq)  # a tiny posterior scale overflows vq: log q -> -inf, the limit
                v = ((-0.5 * vq * vq - _HALF_LOG_2PI) - lsq) - v
            else:
                v = (-0.5 * ec * ec - _HALF_LOG_2PI) - v
        if PER_DIM:
            tl.store(out_ptr + e, v, mask=emask)
        else:
            row += tl.sum(tl.where(emask, v, 0.0), axis=1)
    if not PER_DIM:
        tl.store(out_ptr + rb, row, mask=bmask)


@triton.jit
def _mixture_bwd_kernel(
    grad_ptr, z_ptr, lg_ptr, mu_ptr, ls_ptr, code_ptr, pls_ptr, lse_ptr,
    dz_ptr, dlg_ptr, dmu_ptr, dls_ptr, dcode_ptr, dpls_ptr,
    B, D, M,
    HAS_CODE: tl.constexpr, HAS_SCALE: tl.constexpr, PER_DIM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rb = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    emask = (rb < B)[:, None] & (rd < D)[None, :]
    e = rb[:, None] * D + rd[None, :]
    zz = tl.load(z_ptr + e, mask=emask, other=0.0).to(tl.float32)
    if PER_DIM:
        g = tl.load(grad_ptr + e, mask=emask, other=0.0)
    else:
        g_row = tl.load(grad_ptr + rb, mask=rb < B, other=0.0)
        g = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32) + g_row[:, None]
    if HAS_CODE:
        g = -g  # KL = log q(z) - log p
    big_t = tl.load(lse_ptr + 2 * e, mask=emask, other=0.0)
    lz = tl.load(lse_ptr + 2 * e + 1, mask=emask, other=0.0)
    # A dimension whose every term is -inf has log p = -inf and, by contract, zero gradients.
    dead = (big_t == float("-inf"))[:, :, None]
    sh = _logit_shift(lg_ptr, e, emask, M, BLOCK_B, BLOCK_D, BLOCK_M)[:, :, None]
    gz = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        i = e[:, :, None] * M + rm[None, None, :]
        msk = emask[:, :, None] & (rm < M)[None, None, :]
        lgs = tl.load(lg_ptr + i, mask=msk, other=0.0).to(tl.float32) - sh
        mu = tl.load(mu_ptr + i, mask=msk, other=0.0).to(tl.float32)
        log_s = tl.load(ls_ptr + i, mask=msk, other=0.0).to(tl.float32)
        inv_s = tl.exp(-log_s)
        u = (zz[:, :, None] - mu) * inv_s
        t = lgs - log_s - _HALF_LOG_2PI - 0.5 * u * u
        r = tl.where(dead, 0.0, tl.exp(t - big_t[:, :, None]))  # responsibility
        w = tl.where(dead, 0.0, tl.exp(lgs - lz[:, :, None]))  # mixture weight
        gr = g[:, :, None] * r
        # r == 0 (zero weight or negligible density): exactly zero mean and scale gradients,
        # even where u is infinite (acn::component_grads).
        dm = tl.where(r == 0.0, 0.0, gr * u * inv_s)
        ds = tl.where(r == 0.0, 0.0, gr * (u * u - 1.0))
        dl = g[:, :, None] * (r - w)
        tl.store(dlg_ptr + i, dl.to(dlg_ptr.dtype.element_ty), mask=msk)
        tl.store(dmu_ptr + i, dm.to(dmu_ptr.dtype.element_ty), mask=msk)
        tl.store(dls_ptr + i, ds.to(dls_ptr.dtype.element_ty), mask=msk)
        gz -= tl.sum(tl.where(msk, dm, 0.0), axis=2)
    if HAS_CODE:
        ec = zz - tl.load(code_ptr + e, mask=emask, other=0.0).to(tl.float32)
        go = -g
        if HAS_SCALE:
            # d log q / d(z, code, s_q) = (-v / s, v / s, v^2 - 1), v = (z - code) / s (acn::gaussian_grads)
            inv_q = tl.exp(-tl.load(pls_ptr + e, mask=emask, other=0.0).to(tl.float32))
            vq = ec * inv_q
            gc = go * vq * inv_q
            tl.store(dpls_ptr + e, (go * (vq * vq - 1.0)).to(dpls_ptr.dtype.element_ty), mask=emask)
        else:
            gc = go * ec  # d/dz log N(z; c, 1) = -(z - c)
        gz -= gc
        tl.store(dcode_ptr + e, gc.to(dcode_ptr.dtype.element_ty), mask=emask)
    tl.store(dz_ptr + e, gz.to(dz_ptr.dtype.element_ty), mask=emask)


# --------------------------------------------------------------------------------------------
# Launchers


def _blocks(D: int, M: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, BLOCK_M) for a [B, D, M] problem (launched with 4 warps).

    On a GPU 512 (element, component) pairs per program, four per thread: each carries 64-bit
    addresses and a dozen temporaries, and sm_90 ptxas needs 70 to 170 registers for that (2048
    pairs spill). Under the interpreter 32768, so that small test problems take few programs.
    """
    block_m = min(triton.next_power_of_2(M), 64 if interpret else 16)
    block_d = min(triton.next_power_of_2(max(D, 1)), 64 if interpret else 32)
    target = 32768 if interpret else 512
    block_b = max(1, target // (block_d * block_m))
    return block_b, block_d, block_m


def _check_args(z, logits, means, log_scales, code, posterior_log_scale) -> None:
    check_mixture(z, logits, means, log_scales, code, posterior_log_scale=posterior_log_scale)
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"z has dtype {z.dtype}: the triton backend supports float32, float16 and bfloat16 "
            "(use backend='cpu' or 'torch' for float64)"
        )
    check_device(z.device, _mixture_fwd_kernel)


@torch.library.custom_op("acn_kernels::triton_mixture_fwd", mutates_args=())
def triton_mixture_fwd(
    z: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    code: torch.Tensor | None,
    per_dim: bool,
    posterior_log_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused mixture forward (schema of ``acn_kernels::mixture_fwd`` in csrc/ops.cpp).

    Args:
        z: [B, D]; logits, means, log_scales: [B, D, M]; code: optional [B, D];
            posterior_log_scale: optional [B, D], only with code. All float32, float16 or
            bfloat16, one dtype, on a CUDA device (or the CPU under TRITON_INTERPRET=1).
        per_dim: return per-dimension values [B, D] instead of row sums [B].

    Returns:
        (out, lse): out [B] or [B, D] float32 = log p(z), or with ``code`` the KL estimate
        log q(z) - log p(z), q = N(code, I) or N(code, diag(exp(2 posterior_log_scale)));
        lse [B, D, 2] float32 = (T, Lz) per element, for the backward.
    """
    _check_args(z, logits, means, log_scales, code, posterior_log_scale)
    z, logits, means, log_scales = (t.contiguous() for t in (z, logits, means, log_scales))
    code_c = code.contiguous() if code is not None else z
    pls_c = posterior_log_scale.contiguous() if posterior_log_scale is not None else z
    B, D = z.shape
    M = logits.shape[2]
    out = _testing.new_output((B, D) if per_dim else (B,), torch.float32, z.device)
    lse = _testing.new_output((B, D, 2), torch.float32, z.device)
    block_b, block_d, block_m = _blocks(D, M, z.device.type == "cpu")
    d_per_prog = block_d if per_dim else triton.cdiv(D, block_d) * block_d
    grid = (triton.cdiv(B, block_b), triton.cdiv(D, block_d) if per_dim else 1)
    if B > 0 and grid[1] > 0:
        with device_ctx(z.device):
            _mixture_fwd_kernel[grid](
                z, logits, means, log_scales, code_c, pls_c, out, lse, B, D, M, d_per_prog,
                HAS_CODE=code is not None, HAS_SCALE=posterior_log_scale is not None, PER_DIM=per_dim,
                BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=4,
            )
    return out, lse


@torch.library.custom_op("acn_kernels::triton_mixture_bwd", mutates_args=())
def triton_mixture_bwd(
    grad_out: torch.Tensor,
    z: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    code: torch.Tensor | None,
    lse: torch.Tensor,
    per_dim: bool,
    posterior_log_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused mixture backward (schema of ``acn_kernels::mixture_bwd``), one pass.

    Args:
        grad_out: gradient of ``out`` ([B], or [B, D] with per_dim); z, logits, means, log_scales,
            code, posterior_log_scale as in :func:`triton_mixture_fwd`; lse: the [B, D, 2]
            float32 tensor it returned.

    Returns:
        (dz [B, D], dlogits, dmeans, dlog_scales [B, D, M], dcode [B, D], dposterior_log_scale
        [B, D]; each of the last two an empty tensor when its input is None), in the input dtype.
        Recomputes the responsibilities from the inputs and lse; allocates nothing but the
        gradients.
    """
    _check_args(z, logits, means, log_scales, code, posterior_log_scale)
    z, logits, means, log_scales = (t.contiguous() for t in (z, logits, means, log_scales))
    code_c = code.contiguous() if code is not None else z
    has_scale = posterior_log_scale is not None
    pls_c = posterior_log_scale.contiguous() if has_scale else z
    B, D = z.shape
    M = logits.shape[2]
    if lse.shape != (B, D, 2) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be the [B, D, 2] float32 tensor saved by the forward, got "
                         f"{tuple(lse.shape)} {lse.dtype}")
    want = (B, D) if per_dim else (B,)
    if grad_out.shape != want:
        raise ValueError(f"grad_out must have shape {want}, got {tuple(grad_out.shape)}")
    grad = grad_out.to(torch.float32).contiguous()
    lse = lse.contiguous()
    dz = _testing.new_output(z.shape, z.dtype, z.device)
    dlg = _testing.new_output(logits.shape, z.dtype, z.device)
    dmu = _testing.new_output(logits.shape, z.dtype, z.device)
    dls = _testing.new_output(logits.shape, z.dtype, z.device)
    dcode = _testing.new_output(z.shape if code is not None else (0,), z.dtype, z.device)
    dpls = _testing.new_output(z.shape if has_scale else (0,), z.dtype, z.device)
    block_b, block_d, block_m = _blocks(D, M, z.device.type == "cpu")
    grid = (triton.cdiv(B, block_b), triton.cdiv(D, block_d))
    if B > 0 and D > 0:
        with device_ctx(z.device):
            _mixture_bwd_kernel[grid](
                grad, z, logits, means, log_scales, code_c, pls_c, lse, dz, dlg, dmu, dls,
                dcode if code is not None else dz, dpls if has_scale else dz, B, D, M,
                HAS_CODE=code is not None, HAS_SCALE=has_scale, PER_DIM=per_dim,
                BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=4,
            )
    return dz, dlg, dmu, dls, dcode, dpls


registration.register_mixture("acn_kernels::triton_mixture_fwd", "acn_kernels::triton_mixture_bwd")
