"""The package's import graph (docs/design.md, "Layout"), read from the source with ast:

- the kernel layer never imports the ACN layer (acn_kernels.acn);
- the backends (acn_kernels.triton.*, the reference) never import the public front end (ops);
- no import cycles between modules (imports inside functions included);
- no module uses another module's private (underscored) names;
- nothing in the repository refers to a file outside it
(tests/test_scripts.py checks that nothing imports scripts/).
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "acn_kernels"
pytestmark = pytest.mark.skipif(not PKG.is_dir(), reason="needs the source tree (run from a checkout)")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
COMPILED = {"acn_kernels._C"}  # the extension: a submodule with no source here


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node.level, node.module)
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule itself
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            names = [n for n in names if f"{target}.{n}" not in COMPILED]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest:
                out.append((target, rest))
            out += [(s, []) for s in subs]
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in _imports(m):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _kernel_layer(m: str) -> bool:
    return m != "acn_kernels" and not m.startswith("acn_kernels.acn")


def test_the_graph_is_read():
    assert {"acn_kernels.ops", "acn_kernels.dispatch", "acn_kernels.acn.bank"} <= set(MODULES)
    assert "acn_kernels.checks" in _edges()["acn_kernels.ops"]


def test_kernel_layer_never_imports_the_acn_layer():
    bad = [(m, t) for m, ts in _edges().items() if _kernel_layer(m) for t in ts if t.startswith("acn_kernels.acn")]
    assert not bad, bad


def test_backends_do_not_import_the_front_end():
    backends = [m for m in MODULES if m.startswith("acn_kernels.triton") or m == "acn_kernels.reference"]
    bad = [(m, t) for m in backends for t in _edges()[m] if t in ("acn_kernels", "acn_kernels.ops", "acn_kernels.nn")]
    assert not bad, bad


def test_no_import_cycles():
    graph = _edges()
    # The package roots re-export their modules: an edge into a package's __init__ from one of
    # its own modules would be a cycle through the re-exports.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_private_name_crosses_a_module():
    bad = []
    for m, path in MODULES.items():
        for target, names in _imports(m):
            if target.startswith("acn_kernels"):
                bad += [(m, f"{target}.{n}") for n in names if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    target = (a.name if isinstance(node, ast.Import) else
                              f"{_resolve(m, path.name == '__init__.py', node.level, node.module)}.{a.name}")
                    if target in MODULES:
                        aliases[a.asname or a.name] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")
                    and f"{aliases[node.value.id]}.{node.attr}" not in MODULES
                    and not (aliases[node.value.id] == "acn_kernels._ext" and node.attr == "_C")):
                bad.append((m, f"{aliases[node.value.id]}.{node.attr}"))
    assert not bad, bad


def test_nothing_refers_outside_the_repository():
    """No file names a contract or guide outside the tree (the contract is docs/design.md)."""
    pattern = re.compile(r"\.\./shared|\bDESIGN\.md\b|STYLE\.md")
    suffixes = {".py", ".md", ".cpp", ".cu", ".cuh", ".h", ".sh", ".toml", ".txt", ".in"}
    bad = []
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        top = rel.parts[0]
        if (top.startswith(".") and top != ".ci") or top in ("build", "dist", "runs") \
                or top.endswith(".egg-info") or not p.is_file():
            continue
        if p.suffix in suffixes or rel.parts[0] == ".ci":
            bad += [f"{rel}:{i}" for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                    if pattern.search(line)]
    assert not bad, bad
