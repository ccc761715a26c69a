"""Internals of the Triton backend (acn_kernels/triton/): the launchers' GPU block configurations
run under the interpreter, the ops' own dtype check, and the kernels compiled for sm_90 without
a GPU. The contracts of both ops, Triton included, are tested once in test_masked_topk.py and
test_mixture.py.

Runs on a GPU, or on CPU tensors in a process started with TRITON_INTERPRET=1 (the variable must be
set before the kernels are defined): ``TRITON_INTERPRET=1 pytest -m triton``. Elsewhere the tests
are skipped. Shapes are small: under the interpreter each program costs about a millisecond.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing import (
    HAS_GPU,
    INTERPRET,
    MIXTURE_KINDS,
    assert_topk_close,
    assert_topk_exact,
    check_mixture,
    f64,
    grid_data,
    mixture_inputs,
    poisoned_outputs,
    ref_topk,
    run_topk,
    topk_inputs,
    topk_rtol,
    value_and_grads,
)

import acn_kernels
from acn_kernels import MAX_K, reference

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


def _gpu_config(monkeypatch):
    """Under the interpreter, launch the masked top-K with the configuration it picks for an
    H100 (132 multiprocessors)."""
    from acn_kernels.triton import masked_topk as tmk

    if INTERPRET:
        real = tmk._config
        monkeypatch.setattr(tmk, "_config", lambda B, N, D, k, sms, contiguous=True: real(B, N, D, k, 132,
                                                                                           contiguous))


@pytest.mark.parametrize("b,n,d,k", [(17, 301, 16, 5), (3, 900, 7, 100), (20, 130, 33, 64), (2, 300, 5, 300)])
def test_topk_gpu_configuration(monkeypatch, b, n, d, k):
    """The GPU launch configuration (64-query blocks up to k = 128, 64-row tiles, many splits
    and the merge tree); grid data keeps every distance exact, so the result must equal the
    reference bit for bit; random data within rounding."""
    _gpu_config(monkeypatch)
    g = torch.Generator().manual_seed(n * k)
    q, bank = grid_data(b, d, seed=b + 2, device=DEVICE), grid_data(n, d, seed=n + 2, device=DEVICE)
    mask = (torch.rand(n, generator=g) < 0.3).to(DEVICE)
    excl = torch.randint(-1, n, (b,), generator=g).to(DEVICE)
    assert_topk_exact(run_topk(BE, q, bank, k, mask, excl), ref_topk(q, bank, k, mask, excl))
    q, bank, _, _ = topk_inputs(b, n, d, seed=n * k + 1, device=DEVICE)
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
# The GPU code path without a GPU (issue 10: static proof of the masked top-K's GPU code)

# Compiles kernels for sm_90 (front end, LLVM and ptxas; no driver needed) and prints one JSON
# line per masked top-K variant with what the cubin and the IR say about it. Arguments: the
# variant names to build ("mixture" builds the mixture kernels, "merge" the merge tree's kernel).
_SM90_COMPILE = textwrap.dedent("""
    import json, os, re, subprocess, sys

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from acn_kernels.triton import masked_topk as tt, mixture as tm

    TARGET = GPUTarget("cuda", 90, 32)
    BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    MMA_TYPE = {"fp32": "tf32", "bf16": "bf16", "fp16": "f16"}

    def build(fn, sig, consts, warps, attrs=None):
        sig = {**sig, **{name: "constexpr" for name in consts}}
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs or {})
        return triton.compile(src, target=TARGET, options={"num_warps": warps, "enable_fp_fusion": False})

    def tool(name, *args):
        return subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True, check=True).stdout

    def cubin_facts(c, tmp):
        with open(tmp, "wb") as f:
            f.write(c.asm["cubin"])
        usage = tool("cuobjdump", "--dump-resource-usage", tmp)
        regs, stack, local = (int(re.search(key + r":(\\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL"))
        sass = tool("nvdisasm", "-c", tmp)
        return dict(regs=regs, stack=stack, local=local, shared=c.metadata.shared,
                    local_insts=len(re.findall(r"\\b(?:STL|LDL)\\b", sass)))

    def topk(name, dt, D, k, contiguous):
        cfg = tt._config(4096, 10**6, D, k, 132, contiguous)
        kp, bm = cfg["KP"], cfg["BLOCK_M"]
        sig = dict(q_ptr="*" + dt, b_ptr="*" + dt, c_ptr="*fp32", mask_ptr="*u8", exi_ptr="*i64", queue_ptr="*i32",
                   part_ptr="*i64", dist_ptr="*fp32", idx_ptr="*i64", B="i32", N="i32", D="i32", k="i32",
                   tiles_per_split="i32", stride_qb="i32", stride_qd="i32", stride_bn="i32", stride_bd="i32",
                   alpha="fp32", beta="fp32", eta="fp32", gamma0="fp32")
        consts = dict(HAS_MASK=True, HAS_EXI=True, FINAL=False, MMA=dict(fp32=0, bf16=1, fp16=2)[dt],
                      FP32_OPERANDS=False, ONE_CHUNK=cfg["one_chunk"], BLOCK_Q=cfg["BLOCK_Q"], BLOCK_M=bm,
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], KP=kp, LOG_KP=kp.bit_length() - 1,
                      W=cfg["W"], WC=cfg["WC"], LOG_WC=cfg["WC"].bit_length() - 1)
        names = tt._topk_search_kernel.arg_names
        aligned = [n for n in names if n.endswith("_ptr")]
        aligned += ["B", "N"] + (["D"] if D % 16 == 0 else [])  # as the launcher specialises them
        if contiguous:  # ... and for contiguous rows: unit strides, aligned rows
            consts.update(stride_qd=1, stride_bd=1)
            aligned += ["stride_qb", "stride_bn"] if D % 16 == 0 else []
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        c = build(tt._topk_search_kernel, sig, consts, cfg["num_warps"], attrs)
        ptx, ttir = c.asm["ptx"], c.asm["ttir"]
        threads = 32 * cfg["num_warps"]
        facts = cubin_facts(c, "/tmp/acn_sm90_%d_%s.cubin" % (os.getpid(), name))
        # Strided addresses: every use of a (32-bit) stride argument widens it to 64 bits first.
        strides = [n for n in ("stride_qb", "stride_qd", "stride_bn", "stride_bd") if n not in consts]
        body = [line for line in ttir.splitlines() if "tt.func" not in line]
        uses = {n: [line for line in body if re.search("%" + n + r"\\b", line)] for n in strides}
        narrow = {n: u for n, u in uses.items()
                  if not u or not all(re.search(r"arith.extsi %" + n + r" : i32 to i64", x) for x in u)}
        st64 = sum(int(v or 1) for v in re.findall(r"st\\.global(?:\\.[a-z]+)*?(?:\\.v(\\d))?\\.b64", ptx))
        ld64 = len(re.findall(r"ld\\.global(?:\\.[a-z]+)*?(?:\\.v\\d)?\\.b64", ptx))
        mma = re.findall(r"wgmma\\.mma_async\\.sync\\.aligned\\.[a-z0-9.]*|\\bmma\\.sync\\.aligned\\.[a-z0-9.]*", ptx)
        print(json.dumps(dict(
            name=name, dtype=dt, D=D, k=k, contiguous=contiguous, block_q=cfg["BLOCK_Q"], block_m=bm, kp=kp,
            warps=cfg["num_warps"], **facts,
            mma=len(mma), mma_typed=sum(MMA_TYPE[dt] in m for m in mma), wgmma=sum("wgmma" in m for m in mma),
            fma=len(re.findall(r"\\bfma\\.rn\\.f32", ptx)), mul=len(re.findall(r"\\bmul\\.rn\\.f32", ptx)),
            cuda_core_dot=bm * cfg["BLOCK_N"] * cfg["BLOCK_D"] // threads,
            st64=st64, list_keys=cfg["BLOCK_Q"] * kp // threads, ld64=ld64,
            narrow_strides=sorted(narrow))), flush=True)

    def mixture():
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
        print(json.dumps(dict(name="mixture")), flush=True)

    def merge():
        for kp in (8, 1024):
            cfg = tt._config(1, 10**6, 64, kp, 132)
            sig = dict(part_ptr="*i64", out_ptr="*i64", dist_ptr="*fp32", idx_ptr="*i64", B="i32", S="i32", k="i32")
            for final in (False, True):
                consts = dict(FAN_IN=cfg["fan_in"], FINAL=final, BLOCK_Q=cfg["merge_q"], KP=kp,
                              LOG_KP=kp.bit_length() - 1)
                c = build(tt._topk_merge_kernel, sig, consts, 4)
                print(json.dumps(dict(name="merge%d%s" % (kp, "final" if final else ""), kp=kp,
                                      **cubin_facts(c, "/tmp/acn_sm90_%d_merge.cubin" % os.getpid()))), flush=True)

    VARIANTS = {
        # name: (inputs, D, k, contiguous): every k tier (list sizes 8 to 1024, 64 to 8 queries
        # per program), D in one chunk and in several, each operand type, strided and not.
        "f32_d64_k5": ("fp32", 64, 5, True),
        "bf16_d16_k128": ("bf16", 16, 128, True),
        "f32_d300_k256": ("fp32", 300, 256, False),
        "bf16_d64_k512": ("bf16", 64, 512, True),
        "f32_d64_k1024": ("fp32", 64, 1024, True),
        "bf16_d300_k1024": ("bf16", 300, 1024, False),
        "f16_d32_k40": ("fp16", 32, 40, False),
    }
    for arg in sys.argv[1:]:
        if arg == "mixture":
            mixture()
        elif arg == "merge":
            merge()
        else:
            topk(arg, *VARIANTS[arg])
""")
# Triton 3.6 (the GPU images) allocates registers differently: the variants with 32 list keys
# per thread spill there (measured with 3.6.0: f32_d64_k1024, bf16_d300_k1024, bf16_d64_k512,
# bf16_d16_k128). Every other check holds on 3.6; there the spill check fails as expected.
_SPILLS_BEFORE = (3, 9)
_SM90_GROUPS = [["f32_d64_k1024", "f32_d300_k256", "f32_d64_k5", "mixture"],
                ["bf16_d300_k1024", "bf16_d64_k512", "bf16_d16_k128", "f16_d32_k40", "merge"]]


@pytest.mark.skipif(HAS_GPU, reason="with a GPU every other test compiles and runs the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile the GPU configurations for sm_90 in
    processes without TRITON_INTERPRET (two at once), so a kernel that only the interpreter
    accepts fails here, and prove from the compiled masked top-K (issue 10): the filter's dot is
    tensor-core MMA of the operand type (TF32 / bf16 / fp16; no FMA dot over D: a CUDA-core dot
    of one tile would need ``cuda_core_dot`` multiply-adds per thread); nothing spills (no local
    memory, no STL/LDL in the SASS), and the running list is not kept in global memory either
    (64-bit global stores only for the final write of the list, 64-bit loads only for
    exclude_index); strided address arithmetic is 64-bit in the IR (every stride argument is
    widened before use). Prints registers, shared memory and spills per variant."""
    pytest.importorskip("triton.backends.nvidia")
    import triton

    spills_known = tuple(int(x) for x in triton.__version__.split(".")[:2]) < _SPILLS_BEFORE
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_ALWAYS_COMPILE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _SM90_COMPILE, *group], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for group in _SM90_GROUPS]
    outs = [p.communicate(timeout=540) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    rows = [json.loads(line) for out, _ in outs for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["name"] for r in rows) == sorted(
        [n for g in _SM90_GROUPS for n in g if n != "merge"] + ["merge8", "merge8final", "merge1024", "merge1024final"])
    spilled = []
    for r in rows:
        if r["name"] == "mixture":
            continue
        mma = f", {r['mma']} MMA ({r['wgmma']} wgmma)" if "mma" in r else ""
        print(f"{r['name']:>16}: {r['regs']:3d} registers, {r['shared']:6d} B shared, stack {r['stack']} B, "
              f"{r['local_insts']} local loads/stores{mma}")
        if r["stack"] or r["local"] or r["local_insts"]:
            spilled.append(r["name"])
        if r["name"].startswith("merge"):
            continue
        assert r["mma"] > 0 and r["mma_typed"] == r["mma"], r
        assert r["fma"] == 0 and r["mul"] < r["cuda_core_dot"], r  # the dot is not on CUDA cores
        assert r["wgmma"] > 0 or r["block_m"] < 64, r  # 64 rows and more: Hopper's wgmma
        assert r["st64"] <= r["list_keys"] and r["ld64"] <= 4, r
        assert r["narrow_strides"] == [], r
    if spilled and spills_known:
        pytest.xfail(f"Triton {triton.__version__} (older than 3.9) spills in {spilled}")
    assert not spilled, spilled


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


# ---------------------------------------------------------------------------------------------
# Issue 10: the masked top-K is exact on every input. Results against the float64 direct-form
# brute force with the float32 direct form's error bound (relative to the distance itself, not
# to the norms), and against the CPU kernel bit for bit (the same summation order); the launch
# grid; the GPU tiers under the interpreter. (The interpreter computes tl.dot in float32 on the
# operands rounded as the tensor cores round them; tests/test_filter_band.py emulates the rest.)

_HAS_CPU = acn_kernels.backends()["cpu"]
FLT_MAX = torch.finfo(torch.float32).max


def _direct_bound(t: torch.Tensor, d: int) -> torch.Tensor:
    """Error bound of the float32 direct form sum_d (q_d - b_d)^2 against its exact value t:
    gamma_{D+2} t, plus subnormal squares."""
    g = (d + 2) * 2.0**-24 / (1 - (d + 2) * 2.0**-24)
    return g * t + (d + 2) * 2.0**-149


def assert_direct_form_selection(got, q, bank, k, mask=None, excl=None):
    """(dists, rows) against the float64 brute force: the same eligible pairs (padding where the
    reference pads); each returned distance within the float32 direct-form bound of its row's
    float64 distance (FLT_MAX where that overflows float32); each returned row's float64 distance
    within the bound of the reference's at the same rank (so rows equal the reference's wherever
    its gaps exceed the bound); ascending, ties by row."""
    (d, i), (rd, ri) = got, ref_topk(q, bank, k, mask, excl)
    assert torch.equal(i < 0, ri < 0), "eligible pairs differ"
    assert torch.equal(torch.isinf(d), i < 0)
    fin = i >= 0
    qd, bd = q.cpu().double(), bank.cpu().double()
    t = ((qd[:, None, :] - bd[i.clamp_min(0)]) ** 2).sum(-1)
    dim = q.shape[1]
    over = t > FLT_MAX * (1 - 4 * (dim + 2) * 2.0**-24)  # may overflow float32 (then FLT_MAX)
    dd = d.double()
    ok_d = torch.where(dd == FLT_MAX, over, (dd - t).abs() <= _direct_bound(t, dim))
    assert ok_d[fin].all(), "a distance is off its row's float64 distance"
    ref_over = rd > FLT_MAX * (1 - 4 * (dim + 2) * 2.0**-24)
    ok_r = torch.where(ref_over, over, (t - rd).abs() <= 2 * _direct_bound(rd, dim) + _direct_bound(t, dim))
    assert ok_r[fin].all(), "a row is not the reference's at its rank"
    step = (dd[:, 1:] > dd[:, :-1]) | ((dd[:, 1:] == dd[:, :-1]) & ((i[:, 1:] > i[:, :-1]) | (i[:, 1:] < 0)))
    assert step.all(), "not ascending by (distance, row)"


def assert_same_as_cpu(got, q, bank, k, mask=None, excl=None):
    """Bit for bit the CPU kernel's result (rows and distances), when the extension is built."""
    if not _HAS_CPU:
        return
    cpu = acn_kernels.masked_topk(q.cpu(), bank.cpu(), k, exclude_mask=None if mask is None else mask.cpu(),
                                  exclude_index=None if excl is None else excl.cpu(), backend="cpu")
    assert torch.equal(got[1], cpu.indices), "rows differ from the CPU kernel's"
    assert torch.equal(got[0], cpu.dists), "distances differ from the CPU kernel's"


@st.composite
def _hard_problems(draw):
    """Data that stress the filter: far from the origin, huge and tiny norms, near and exact
    duplicate rows, queries sitting on rows, masks, exclude_index, NaN/inf rows and queries."""
    b, n, d = draw(st.integers(1, 20)), draw(st.integers(1, 300)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    if dtype == torch.float16:
        offset, scale = draw(st.sampled_from([0.0, 300.0, -2e3])), draw(st.sampled_from([1e-3, 1.0, 10.0]))
    else:
        offset = draw(st.sampled_from([0.0, 1e3, -3e4, 1e6]))
        scale = draw(st.sampled_from([1e-15, 1e-3, 1.0, 1e12, 1e19]))
    return dict(b=b, n=n, d=d, k=draw(st.integers(1, min(n, MAX_K))), dtype=dtype, offset=offset, scale=scale,
                dup=draw(st.sampled_from(["none", "near", "exact"])), mask_p=draw(st.sampled_from([0.0, 0.3, 0.9])),
                excl=draw(st.booleans()), nonfinite=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _make_problem(p):
    g = torch.Generator().manual_seed(p["seed"])
    b, n, d = p["b"], p["n"], p["d"]
    bank = p["offset"] + p["scale"] * torch.randn(n, d, generator=g, dtype=torch.float64)
    if p["dup"] == "near" and n > 1:
        bank[1::2] = bank[: n // 2] * (1 + 1e-6 * torch.randn(n // 2, d, generator=g, dtype=torch.float64))
    elif p["dup"] == "exact" and n > 1:
        bank = bank[torch.randint(0, max(1, n // 3), (n,), generator=g)]
    q = p["offset"] + p["scale"] * torch.randn(b, d, generator=g, dtype=torch.float64)
    q[::2] = bank[torch.randint(0, n, (len(range(0, b, 2)),), generator=g)]  # queries on rows
    q, bank = q.to(p["dtype"]), bank.to(p["dtype"])
    if p["nonfinite"]:
        bad = torch.tensor([math.nan, math.inf, -math.inf], dtype=p["dtype"])
        rows = torch.randint(0, n, (3,), generator=g)
        bank[rows, torch.randint(0, d, (3,), generator=g)] = bad
        q[torch.randint(0, b, (1,), generator=g), 0] = math.nan
    mask = (torch.rand(n, generator=g) < p["mask_p"]).to(DEVICE)
    excl = torch.randint(-1, n, (b,), generator=g).to(DEVICE) if p["excl"] else None
    return q.to(DEVICE), bank.to(DEVICE), mask, excl


@given(p=_hard_problems())
def test_topk_exact_on_hard_data(p):
    """Fresh hard problems (hypothesis): the float64 brute force within the direct form's bound,
    and the CPU kernel bit for bit."""
    q, bank, mask, excl = _make_problem(p)
    got = run_topk(BE, q, bank, p["k"], mask, excl)
    assert_direct_form_selection(got, q, bank, p["k"], mask, excl)
    assert_same_as_cpu(got, q, bank, p["k"], mask, excl)


@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_topk_far_from_origin(offset):
    """The issue's failing case: codes sharing a large offset, neighbours much closer than the
    norms. The expanded form alone loses every digit; the centred filter and the direct-form
    rescoring give the exact selection."""
    g = torch.Generator().manual_seed(int(offset))
    bank = offset + torch.randn(700, 16, generator=g)
    q = bank[:9] + 1e-2 * torch.randn(9, 16, generator=g)
    got = run_topk(BE, q.to(DEVICE), bank.to(DEVICE), 7)
    assert_direct_form_selection(got, q, bank, 7)
    assert_same_as_cpu(got, q, bank, 7)
    assert (got[1][:, 0] == torch.arange(9)).all()


def test_topk_rows_on_the_band_edge(monkeypatch):
    """Rows whose TF32 operands all lose the most the truncation can take (the data of
    tests/test_filter_band.py, with its centre): every near-duplicate row of each query is found,
    exactly as the CPU kernel finds them. (Under the interpreter the operands are truncated as
    on the GPU and the accumulator rounds to nearest; half inputs are exact in their own MMA.)"""
    from test_filter_band import _edge_data

    from acn_kernels.triton import masked_topk as tmk

    b, n, d = 3, 40, 32
    q, bank, c = _edge_data("tf32", b, n, d, seed=5)
    monkeypatch.setattr(tmk, "_centre", lambda *_: c.to(DEVICE))
    got = run_topk(BE, q.to(DEVICE), bank.to(DEVICE), n)
    assert_direct_form_selection(got, q, bank, n)
    assert_same_as_cpu(got, q, bank, n)


def test_topk_max_k_on_hard_data():
    """k = MAX_K on data far from the origin with duplicate rows, masks and an excluded row."""
    g = torch.Generator().manual_seed(11)
    distinct = 5e3 + torch.randn(400, 12, generator=g)
    bank = distinct[torch.randint(0, 400, (MAX_K + 90,), generator=g)]
    q = bank[:3] + 1e-3 * torch.randn(3, 12, generator=g)
    mask = torch.rand(MAX_K + 90, generator=g) < 0.12
    excl = torch.tensor([0, -1, 5])
    got = run_topk(BE, q.to(DEVICE), bank.to(DEVICE), MAX_K, mask.to(DEVICE), excl.to(DEVICE))
    assert_direct_form_selection(got, q, bank, MAX_K, mask, excl)
    assert_same_as_cpu(got, q, bank, MAX_K, mask, excl)
    assert (got[1] == -1).any()  # fewer than MAX_K eligible rows


@pytest.mark.parametrize("b,n,d,k,strided", [(5, 1100, 20, 1024, False), (9, 700, 70, 200, False),
                                             (4, 600, 24, 40, True), (3, 800, 9, 600, True)])
def test_topk_gpu_tiers(monkeypatch, b, n, d, k, strided):
    """The GPU launch configuration's tiers (8 queries per program with a 16-row dot at k = 1024,
    16 at k = 256, D in several chunks, strided rows), run under the interpreter too, on data
    far from the origin."""
    _gpu_config(monkeypatch)
    g = torch.Generator().manual_seed(n + k)
    bank = -2e3 + torch.randn(n, d, generator=g)
    q = bank[torch.arange(b) * 3] + 1e-3 * torch.randn(b, d, generator=g)
    if strided:
        bank = bank.t().contiguous().t()
        assert bank.stride(1) != 1
    mask = torch.rand(n, generator=g) < 0.2
    got = run_topk(BE, q.to(DEVICE), bank.to(DEVICE), k, mask.to(DEVICE))
    assert_direct_form_selection(got, q, bank, k, mask)
    assert_same_as_cpu(got, q, bank, k, mask)


def test_topk_launch_grid_fills_an_h100():
    """B = 1 against N = 10^6 (and larger batches) launches at least two programs per
    multiprocessor of an H100 (132), and no program of the merge tree merges more than FAN_IN
    lists: B = 1 does not serialise on one program."""
    from acn_kernels.triton import masked_topk as tmk

    for B, D, k, contiguous in [(1, 64, 1024, True), (1, 64, 5, True), (1, 300, 1024, False), (4096, 64, 5, True),
                                (4096, 64, 1024, True), (37, 16, 128, True)]:
        cfg = tmk._config(B, 10**6, D, k, 132, contiguous)
        blocks, splits = cfg["grid"]
        assert blocks == -(-B // cfg["BLOCK_Q"]) and blocks * splits >= 2 * 132, (B, k, cfg)
        assert splits * cfg["tiles_per_split"] * cfg["BLOCK_N"] >= 10**6
        levels = tmk._merge_levels(B, cfg)
        assert [s_in for _, s_in, _ in levels][:1] == ([splits] if splits > 1 else [])
        for (grid, s_in, s_out) in levels:
            assert s_out == -(-s_in // cfg["fan_in"]) and grid == (-(-B // cfg["merge_q"]), s_out)
        if B == 1:
            assert levels[0][0][1] >= splits // cfg["fan_in"] >= 32  # the first level alone spreads wide
