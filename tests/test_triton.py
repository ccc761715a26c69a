"""Internals of the Triton backend (acn_kernels/triton/): the launchers' GPU block configurations
run under the interpreter, the ops' own dtype check, and the kernels compiled for sm_90 without
a GPU. The contracts of both ops, Triton included, are tested once in test_masked_topk.py and
test_mixture.py.

Runs on a GPU, or on CPU tensors in a process started with TRITON_INTERPRET=1 (the variable must be
set before the kernels are defined): ``TRITON_INTERPRET=1 pytest -m triton``. Elsewhere the tests
are skipped. Shapes are small: under the interpreter each program costs about a millisecond.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from testing import (
    HAS_GPU,
    INTERPRET,
    MIXTURE_KINDS,
    assert_topk_close,
    assert_topk_exact,
    check_mixture,
    f64,
    grid_data,
    known_bug,
    mixture_inputs,
    poisoned_outputs,
    ref_topk,
    run_topk,
    topk_inputs,
    topk_rtol,
    value_and_grads,
)

import acn_kernels
from acn_kernels import reference

_AVAILABLE = acn_kernels.backends()["triton"]
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _AVAILABLE, reason="the triton backend needs a GPU or TRITON_INTERPRET=1"),
    # The interpreter evaluates masked-off lanes too (e.g. -inf - -inf); numpy warns about them.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"
BE = "triton"


# ---------------------------------------------------------------------------------------------
# The GPU launch configurations, under the interpreter too


@pytest.mark.parametrize("b,d,m", [(5, 40, 17), (9, 3, 2), (3, 70, 33)])
def test_mixture_gpu_blocks(monkeypatch, b, d, m):
    """The GPU block sizes (32 dimensions by 16 components, so several chunks of each)."""
    from acn_kernels.triton import mixture as triton_mixture

    if INTERPRET:
        real = triton_mixture._blocks
        monkeypatch.setattr(triton_mixture, "_blocks", lambda D, M, interpret: real(D, M, False))
    inputs = mixture_inputs(b, d, m, seed=m, device=DEVICE)
    for kind in MIXTURE_KINDS:
        check_mixture(kind, BE, inputs)


@pytest.mark.parametrize("b,n,d,k", [(17, 301, 16, 5), (3, 900, 7, 100), (20, 130, 33, 64), (2, 300, 5, 300)])
def test_topk_gpu_configuration(monkeypatch, b, n, d, k):
    """The GPU launch configuration (tl.dot, 16-query blocks, 64-row tiles, many splits and the
    merge kernel); grid data keeps the dot exact, so the result must equal the reference bit for
    bit; random data within rounding."""
    from acn_kernels.triton import masked_topk as triton_topk

    if INTERPRET:
        real = triton_topk._config
        monkeypatch.setattr(triton_topk, "_config", lambda B, N, D, k, sms: real(B, N, D, k, 132))
    g = torch.Generator().manual_seed(n * k)
    q, bank = grid_data(b, d, seed=b + 2, device=DEVICE), grid_data(n, d, seed=n + 2, device=DEVICE)
    mask = (torch.rand(n, generator=g) < 0.3).to(DEVICE)
    excl = torch.randint(-1, n, (b,), generator=g).to(DEVICE)
    assert_topk_exact(run_topk(BE, q, bank, k, mask, excl), ref_topk(q, bank, k, mask, excl))
    q, bank, _, _ = topk_inputs(b, n, d, seed=n * k + 1, device=DEVICE)
    with known_bug(BE, {BE: "triton-dists"}):
        assert_topk_close(run_topk(BE, q, bank, k), ref_topk(q, bank, k), q, bank, rtol=2 * topk_rtol(q.dtype, d))


def test_ops_reject_float64_at_their_boundary():
    """The registered ops are callable directly: float64 (not in the capability table's Triton
    dtypes) raises a TypeError naming the supported dtypes."""
    from acn_kernels.triton import masked_topk, mixture  # noqa: F401  (registers the ops)

    z, lg, mu, ls, code = mixture_inputs(2, 3, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        torch.ops.acn_kernels.triton_mixture_fwd(z, lg, mu, ls, code, False)
    q, bank = grid_data(2, 3, seed=0, dtype=torch.float64, device=DEVICE), grid_data(10, 3, seed=1,
                                                                                      dtype=torch.float64,
                                                                                      device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        torch.ops.acn_kernels.triton_masked_topk(q, bank, 3, None, None)


# ---------------------------------------------------------------------------------------------
# The GPU code path without a GPU

_SM90_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from acn_kernels.triton import masked_topk as tt, mixture as tm

    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig, consts, warps):
        sig = {**sig, **{name: "constexpr" for name in consts}}
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options={"num_warps": warps})

    for dt, has_code, has_scale, per_dim, (d, m) in [("fp32", True, True, False, (16, 3)),
                                                     ("bf16", False, False, True, (40, 17))]:
        bb, bd, bm = tm._blocks(d, m, False)
        consts = dict(HAS_CODE=has_code, HAS_SCALE=has_scale, PER_DIM=per_dim, BLOCK_B=bb, BLOCK_D=bd,
                      BLOCK_M=bm)
        ins = {n: "*" + dt for n in ("z_ptr", "lg_ptr", "mu_ptr", "ls_ptr", "code_ptr", "pls_ptr")}
        build(tm._mixture_fwd_kernel, {**ins, "out_ptr": "*fp32", "lse_ptr": "*fp32", "B": "i32", "D": "i32",
                                       "M": "i32", "d_per_prog": "i32"}, consts, 4)
        grads = {n: "*" + dt for n in ("dz_ptr", "dlg_ptr", "dmu_ptr", "dls_ptr", "dcode_ptr", "dpls_ptr")}
        build(tm._mixture_bwd_kernel, {"grad_ptr": "*fp32", **ins, "lse_ptr": "*fp32", **grads, "B": "i32",
                                       "D": "i32", "M": "i32"}, consts, 4)
    for dt, k, final in [("fp32", 5, False), ("fp16", 40, True), ("fp32", 1024, False)]:
        cfg = tt._config(128, 60000, 16, k, 132)
        kp = cfg["KP"]
        sig = dict(q_ptr="*" + dt, b_ptr="*" + dt, mask_ptr="*u8", exi_ptr="*i64", part_ptr="*i64",
                   dist_ptr="*fp32", idx_ptr="*i64", B="i32", N="i32", D="i32", k="i32",
                   tiles_per_split="i32", stride_qb="i64", stride_qd="i32", stride_bn="i64", stride_bd="i32")
        build(tt._topk_partial_kernel, sig, dict(
            HAS_MASK=True, HAS_EXI=True, FINAL=final, USE_DOT=cfg["use_dot"], BLOCK_Q=cfg["BLOCK_Q"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], KP=kp, LOG_N=cfg["BLOCK_N"].bit_length() - 1,
            LOG_KP=kp.bit_length() - 1), cfg["num_warps"])
        merge_sig = dict(part_ptr="*i64", dist_ptr="*fp32", idx_ptr="*i64", B="i32", S="i32", k="i32")
        merge_consts = dict(BLOCK_Q=cfg["merge_q"], KP=kp, LOG_KP=kp.bit_length() - 1)
        build(tt._topk_merge_kernel, merge_sig, merge_consts, 4)
    print("compiled")
""")


@pytest.mark.skipif(HAS_GPU, reason="with a GPU every other test compiles and runs the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile the GPU configurations of every
    kernel for sm_90 (front end, LLVM and ptxas; no driver needed) in a process without
    TRITON_INTERPRET, so a kernel that only the interpreter accepts fails here."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                         timeout=540)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# Issue 16 (reliability)


@pytest.mark.parametrize("scale", [1e6, 1e10, 1e30])
def test_issue16_large_logits_gpu_blocks(monkeypatch, scale):
    """Logits far from the origin (per-row offsets of +-scale plus O(1) differences, and the same
    logits times scale) with the GPU block sizes, so that the logits' maximum is taken across
    several 16-component chunks before the joint terms: forward and every gradient against the
    float64 reference (the raw-logit log-sum-exps cancelled to 0 at 1e10)."""
    from acn_kernels.triton import mixture as triton_mixture

    if INTERPRET:
        real = triton_mixture._blocks
        monkeypatch.setattr(triton_mixture, "_blocks", lambda D, M, interpret: real(D, M, False))
    z, lg, mu, ls, code = mixture_inputs(5, 40, 33, seed=31, device=DEVICE)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], device=DEVICE).view(-1, 1, 1)
    for logits in (sign * scale * (1.0 + 0.1 * torch.arange(5.0, device=DEVICE).view(-1, 1, 1)) + lg,
                   lg * scale):
        for kind in MIXTURE_KINDS:
            _, (ref, _) = check_mixture(kind, BE, [z, logits, mu, ls, code])
            if kind == "log_prob":  # a sum of 40 dimensions: far from 0, which the old kernels returned
                assert ref.abs().min() > 1.0


# ---------------------------------------------------------------------------------------------
# Issue 13: acn_kl with a posterior log-scale; one Gaussian as an M = 1 mixture


def assert_close_f64(got, want, rtol, atol):
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("b,d,m", [(1, 1, 1), (6, 11, 4), (9, 67, 16), (40, 3, 1)])
def test_acn_kl_posterior_log_scale_vs_reference(b, d, m):
    z, lg, mu, ls, code = mixture_inputs(b, d, m, seed=b + d + m)
    g = torch.Generator().manual_seed(b * d)
    pls = torch.empty(b, d, dtype=torch.float64).uniform_(-6.0, 6.0, generator=g).to(dtype=torch.float32,
                                                                                       device=DEVICE)
    inputs = [z, code, lg, mu, ls, pls]

    def tri(*t):
        return acn_kernels.acn_kl(*t[:5], posterior_log_scale=t[5], backend=BE)

    with poisoned_outputs():
        out, grads = value_and_grads(tri, inputs)
    want, want_grads = value_and_grads(reference.acn_kl, f64(inputs))
    assert out.dtype == torch.float32 and out.shape == (b,)
    assert_close_f64(out, want, 1e-4, 1e-4 * (want.abs().max().item() + 1))
    for got, w in zip(grads, want_grads, strict=True):
        assert_close_f64(got, w, 1e-3, 1e-4 * (w.abs().max().item() + 1))


def test_as_mixture_on_triton_is_one_gaussian():
    z, _, mu, ls, code = mixture_inputs(7, 13, 1, seed=3)
    mean, log_scale = mu[..., 0].contiguous(), ls[..., 0].contiguous()
    got = acn_kernels.acn_kl(z, code, *acn_kernels.as_mixture(mean, log_scale), backend=BE)
    zz, cc, mm, ss = f64([z, code, mean, log_scale])
    normal = torch.distributions.Normal
    want = (normal(cc, 1.0).log_prob(zz) - normal(mm, ss.exp()).log_prob(zz)).sum(-1)
    assert_close_f64(got, want, 1e-5, 1e-4)
