"""Package-level behaviour: build flags, thread use, dispatch, import without the extension."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from testing import requires_ext

import acn_kernels
from acn_kernels import _ext


@requires_ext
def test_built_with_openmp_and_uses_every_thread():
    assert _ext.C.built_with_openmp()
    n = torch.get_num_threads()
    assert _ext.C.parallel_threads_seen(64 * n) == n


def test_backends_report():
    av = acn_kernels.backends()
    assert set(av) == {"cpu", "cuda", "triton", "torch"} and av["torch"] is True
    assert av["cpu"] == (_ext.C is not None)


def test_max_k():
    assert acn_kernels.MAX_K >= 1024
    if _ext.C is not None:
        assert int(_ext.C.MAX_K) == acn_kernels.MAX_K


def _mix_args():
    z = torch.randn(2, 3)
    p = torch.randn(2, 3, 2)
    return z, p, p, p


def test_env_backend_and_errors(monkeypatch):
    monkeypatch.setenv("ACN_KERNELS_BACKEND", "torch")
    out = acn_kernels.mixture_log_prob(*_mix_args())
    assert out.shape == (2,)
    monkeypatch.setenv("ACN_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ACN_KERNELS_BACKEND must be one of"):
        acn_kernels.mixture_log_prob(*_mix_args())
    monkeypatch.setenv("ACN_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="ACN_KERNELS_BACKEND='cuda' cannot run"):
        acn_kernels.mixture_log_prob(*_mix_args())
    monkeypatch.setenv("ACN_KERNELS_BACKEND", "auto")
    assert acn_kernels.mixture_log_prob(*_mix_args()).shape == (2,)
    # an explicit argument wins over the variable
    monkeypatch.setenv("ACN_KERNELS_BACKEND", "nonsense")
    assert acn_kernels.mixture_log_prob(*_mix_args(), backend="torch").shape == (2,)


def test_explicit_backend_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        acn_kernels.mixture_log_prob(*_mix_args(), backend="gpu")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        acn_kernels.masked_topk(torch.randn(2, 3), torch.randn(5, 3), 2, backend="cuda")
    if not acn_kernels.backends()["triton"]:
        with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
            acn_kernels.mixture_log_prob(*_mix_args(), backend="triton")


def test_import_without_extension_warns_once_and_falls_back(tmp_path):
    """A broken _C never breaks the import: one warning, automatic dispatch uses "torch"."""
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'acn_kernels._C':\n"
        "            raise ImportError('simulated broken build')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, acn_kernels\n"
        "    load = [x for x in w if 'could not be loaded' in str(x.message)]\n"
        "    assert len(load) == 1, [str(x.message) for x in w]\n"
        "    assert acn_kernels.backends()['cpu'] is False\n"
        "    z = torch.randn(2, 3); p = torch.randn(2, 3, 2)\n"
        "    acn_kernels.mixture_log_prob(z, p, p, p)\n"
        "    acn_kernels.mixture_log_prob(z, p, p, p)\n"
        "    fb = [x for x in w if 'using the' in str(x.message)]\n"
        "    assert len(fb) == 1, [str(x.message) for x in w]\n"
        "    try:\n"
        "        acn_kernels.mixture_log_prob(z, p, p, p, backend='cpu')\n"
        "    except RuntimeError as e:\n"
        "        assert 'did not load' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('explicit cpu backend must fail')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ACN_KERNELS_BACKEND", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ------------------------------------------------------------------------------------------------
# Issue 14: the source distribution and the installed metadata

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="no source tree (tests copied out beside a wheel)")
def test_sdist_lists_every_build_input_and_test(tmp_path):
    """setuptools' file list for the sdist (SOURCES.txt, what `python -m build --sdist` archives)
    holds every C++/CUDA source and header under csrc/ and every test module: a new header that
    MANIFEST.in does not ship would break `pip install` from the sdist at its first #include."""
    res = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    listed = set((tmp_path / "acn_kernels.egg-info" / "SOURCES.txt").read_text().splitlines())
    sources = [p for p in ROOT.glob("csrc/**/*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")]
    wanted = {p.relative_to(ROOT).as_posix() for p in [*sources, *ROOT.glob("tests/**/*.py")]}
    assert {".h", ".cpp", ".cu"} <= {p.suffix for p in sources}  # the globs see the sources
    wanted |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"}
    assert wanted <= listed, sorted(wanted - listed)


def test_installed_version_is_the_package_version():
    """One version: the distribution's metadata is read from acn_kernels.__version__."""
    try:
        installed = importlib.metadata.version("acn-kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("acn-kernels is not installed (imported from the path only)")
    assert installed == acn_kernels.__version__
