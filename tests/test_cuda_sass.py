"""Static proof of the CUDA masked top-K kernels, without a GPU (issue 11), and GPU checks of
its tensor-core path.

Without a GPU: csrc/cuda/masked_topk.cu is compiled for sm_90 with plain nvcc (the flags of
scripts/ci_cuda_check.sh, -Xptxas -v), and
- ptxas must report 0 bytes of spill stores and loads for every kernel and function;
- `cuobjdump -sass` must show tensor-core instructions (HMMA or HGMMA) inside a loop of every
  tensor-core partial kernel (the filter), one per input dtype and tile shape;
- registers and static shared memory per kernel, and the SASS instruction mix of the filter
  loop, are printed into the log (BENCHMARKS.md's GPU estimate is built from them).
Skipped, with the reason, when nvcc or cuobjdump is missing (cuobjdump is looked for on PATH,
in $CUDA_HOME/bin and in Triton's wheel). About 30 s of CPU.

With a GPU and the CUDA build: the tensor-core path (float32/float16/bfloat16, B >= 32 on
sm_80+) returns bit for bit the rows and distances of the CPU kernel, whose direct-form
summation order it reproduces, on data that stresses the filter (ties, far from the origin,
huge values, NaN/inf, masks, exclusions), unaligned inputs, k = MAX_K and many bank splits.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torch
from testing import poisoned_outputs

import acn_kernels
from acn_kernels import MAX_K

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "masked_topk.cu"
# The plain-nvcc flags of scripts/ci_cuda_check.sh (torch's CUDAExtension flags, warnings as errors).
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "-Werror", "all-warnings", f"-I{ROOT / 'csrc' / 'include'}",
]
# Tensor-core partial kernels: 3 input dtypes x 2 tile shapes (query tile x bank tile).
TC_KERNELS = {(dt, shape) for dt in ("float", "__half", "__nv_bfloat16") for shape in ("128, 64", "64, 32")}


def _executable(path: str | None) -> str | None:
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def find_tool(name: str) -> str | None:
    """`name` from $NVCC (for nvcc), PATH, $CUDA_HOME/bin, or Triton's wheel (which ships
    cuobjdump and nvdisasm in triton/backends/nvidia/bin)."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [os.environ.get("NVCC") if name == "nvcc" else None, shutil.which(name),
                  os.path.join(cuda_home, "bin", name)]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name))
    return next((p for p in map(_executable, candidates) if p), None)


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable kernel names (c++filt when present), without the namespaces."""
    out = dict(zip(names, names, strict=True))
    filt = shutil.which("c++filt")
    if filt and names:
        res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True)
        out = dict(zip(names, res.stdout.splitlines(), strict=True))
    strip = re.compile(r"acn::cuda::\(anonymous namespace\)::")
    return {k: strip.sub("", v) for k, v in out.items()}


Kernel = collections.namedtuple("Kernel", "registers smem spill_stores spill_loads")


def parse_ptxas(log: str) -> tuple[dict[str, Kernel], list[tuple[str, int, int]]]:
    """ptxas -v output -> per entry function (registers, static smem, spills), and the spill
    figures of every function ptxas reports (entries and non-inlined callees)."""
    kernels: dict[str, Kernel] = {}
    spills: list[tuple[str, int, int]] = []
    entry = None
    props = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            entry = m.group(1)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props is not None:
            spills.append((props, int(m.group(1)), int(m.group(2))))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            own = next((sp for sp in reversed(spills) if sp[0] == entry), (entry, 0, 0))
            kernels[entry] = Kernel(int(m.group(1)), int(smem.group(1)) if smem else 0, own[1], own[2])
            entry = None
    return kernels, spills


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """cuobjdump -sass -> per function, (address, opcode, operands) of each instruction."""
    funcs: dict[str, list[tuple[int, str, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def loops(instrs: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """[start, end] address ranges closed by a backward branch."""
    out = []
    for addr, op, args in instrs:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) <= addr:
                out.append((int(m.group(1), 16), addr))
    return out


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """(ptxas log, SASS text) of masked_topk.cu for sm_90."""
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None:
        pytest.skip("nvcc not found ($NVCC, PATH, $CUDA_HOME/bin)")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin, triton/backends/nvidia/bin)")
    obj = tmp_path_factory.mktemp("sass") / "masked_topk_sm90.o"
    res = subprocess.run([nvcc, *NVCC_FLAGS, "-arch=sm_90", "-Xptxas", "-v", "-c", str(SOURCE), "-o", str(obj)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    return res.stdout + res.stderr, sass


def _tc_key(name: str) -> tuple[str, str] | None:
    m = re.search(r"tc_partial_kernel<([\w:]+), (\d+), (\d+)>", name)
    return (m.group(1), f"{m.group(2)}, {m.group(3)}") if m else None


def test_no_spills_and_resources_printed(sm90, capsys):
    log, _ = sm90
    kernels, spills = parse_ptxas(log)
    assert kernels, "ptxas -v reported no kernels:\n" + log
    names = demangle(sorted(kernels))
    with capsys.disabled():
        print("\nmasked_topk.cu, sm_90 (ptxas -v): registers, static shared memory, spills per kernel")
        for mangled in sorted(kernels, key=lambda n: names[n]):
            k = kernels[mangled]
            print(f"  {k.registers:4d} regs {k.smem:6d} B smem  spill st/ld {k.spill_stores}/{k.spill_loads}  "
                  f"{names[mangled]}")
        print("  (the partial kernels' shared memory is dynamic: set by the plan, see BENCHMARKS.md)")
    bad = [s for s in spills if s[1] or s[2]]
    assert not bad, f"ptxas spills: {bad}"
    assert {_tc_key(n) for n in names.values()} - {None} == TC_KERNELS


def test_tensor_cores_in_the_filter_loop(sm90, capsys):
    _, sass = sm90
    funcs = parse_sass(sass)
    names = demangle(sorted(funcs))
    found = set()
    for mangled, instrs in funcs.items():
        key = _tc_key(names[mangled])
        if key is None:
            continue
        mma = [a for a, op, _ in instrs if op.startswith(("HMMA", "HGMMA"))]
        assert mma, f"no HMMA/HGMMA in {names[mangled]}"
        ranges = loops(instrs)
        in_loop = [a for a in mma if any(lo <= a <= hi for lo, hi in ranges)]
        assert in_loop, f"no tensor-core instruction inside a loop of {names[mangled]}"
        # The innermost loop holding the MMAs: its instruction mix (per chunk of 16 words of the rows).
        lo, hi = min(((lo, hi) for lo, hi in ranges if lo <= in_loop[0] <= hi), key=lambda r: r[1] - r[0])
        mix = collections.Counter(op.split(".")[0] for a, op, _ in instrs if lo <= a <= hi)
        with capsys.disabled():
            print(f"\n{names[mangled]}: filter loop {hi - lo + 16} bytes, "
                  + ", ".join(f"{op} {n}" for op, n in mix.most_common()))
        found.add(key)
    assert found == TC_KERNELS


# ---------------------------------------------------------------------------------------------
# On a GPU: the tensor-core path against the CPU kernel, bit for bit.

HAS_CUDA_BACKEND = torch.cuda.is_available() and acn_kernels.backends()["cuda"]
requires_sm80 = pytest.mark.skipif(
    not HAS_CUDA_BACKEND or torch.cuda.get_device_capability()[0] < 8,
    reason="needs an sm_80+ GPU and _C built with CUDA",
)


def _both(q, bank, k, mask=None, excl=None):
    """(cuda result on the CPU, cpu-backend result), outputs poisoned."""
    with poisoned_outputs():
        got = acn_kernels.masked_topk(q.cuda(), bank.cuda(), k, exclude_mask=None if mask is None else mask.cuda(),
                                      exclude_index=None if excl is None else excl.cuda(), backend="cuda")
        want = acn_kernels.masked_topk(q.cpu(), bank.cpu(), k, exclude_mask=mask, exclude_index=excl,
                                       backend="cpu")
    return (got[0].cpu(), got[1].cpu()), want


def _assert_identical(got, want):
    assert torch.equal(got[1], want[1]), "rows differ from the CPU kernel"
    assert torch.equal(got[0], want[0]), "distances differ from the CPU kernel"


# (B, N, D, k): both tile shapes (B <= 64 takes 64 x 32), D not a multiple of the 16-byte staging
# (plain copies) and of the MMA chunk, k = MAX_K (flushes of two lists at a time), many splits.
TC_SHAPES = [(300, 5000, 64, 5), (77, 3001, 33, 40), (40, 2000, 17, MAX_K), (64, 60_000, 8, 128), (1000, 700, 3, 1)]


@pytest.mark.cuda
@requires_sm80
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,n,d,k", TC_SHAPES)
def test_tensor_core_path_is_the_cpu_kernel(dtype, b, n, d, k):
    g = torch.Generator().manual_seed(b * n + d + k)
    q = torch.randn(b, d, generator=g).to(dtype)
    bank = torch.randn(n, d, generator=g).to(dtype)
    bank[::97] = bank[5]  # exact ties across tiles and splits
    q[3] = bank[5]
    mask = torch.rand(n, generator=g) < 0.5
    excl = torch.randint(-1, n, (b,), generator=g)
    _assert_identical(*_both(q, bank, k, mask, excl))
    _assert_identical(*_both(q, bank, min(k, n)))


@pytest.mark.cuda
@requires_sm80
def test_tensor_core_path_stressed_filter():
    """Far from the origin (a wide band), huge rows and queries (never filtered), NaN/inf rows and
    queries (never paired), overflowing pairs (FLT_MAX), unaligned inputs (plain copies)."""
    g = torch.Generator().manual_seed(11)
    b, n, d = 96, 4000, 24
    flat = torch.randn(n * d + 1, generator=g) * 3 + 1e3
    bank = flat[1:].view(n, d)  # 4 bytes past a 16-byte boundary: the unaligned staging path
    q = torch.randn(b, d, generator=g) * 3 + 1e3
    bank[7] = 1e19
    bank[8, 3] = float("nan")
    bank[9, 0] = float("inf")
    q[1] = -1e19  # overflows against every row: FLT_MAX
    q[2, 5] = float("nan")
    q[4] = 1e30
    got, want = _both(q, bank, 50)
    _assert_identical(got, want)
    assert (got[1][2] == -1).all() and (got[0][1] == torch.finfo(torch.float32).max).all()
