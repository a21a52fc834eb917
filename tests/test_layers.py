"""The import layers (pyproject.toml [tool.importlinter]): each package imports only the layers below it, checked by
import-linter's `lint-imports` on the real package, and shown to catch an upward import in a copy of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "synthmed"
CONTRACT = "synthmed layers (shared/design.md)"
# the lowest layers first: the upward import goes into the first of these modules that exists
LOW_MODULES = ("core/io.py", "core/__init__.py", "config/__init__.py", "data/__init__.py")


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """`lint-imports pyproject.toml` in `cwd` with this interpreter; `pythonpath` goes first on the import path."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command(prog_name='lint-imports'))",
           "--no-cache", "--no-logo", "pyproject.toml"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{CONTRACT} KEPT" in proc.stdout, proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """A copy of the package with one upward import (lowest layer -> synthmed.pipelines) under the same contract fails,
    and the report names that import, which exists only in the copy, so the copy is what was analysed."""
    copy = tmp_path / "src" / "synthmed"
    shutil.copytree(PACKAGE, copy, ignore=lambda folder, names: [n for n in names if n == "__pycache__" or (Path(folder, n).is_file() and not n.endswith(".py"))])
    rel = next(m for m in LOW_MODULES if (copy / m).is_file())
    low = "synthmed." + rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    with open(copy / rel, "a") as fh:
        fh.write("\nimport synthmed.pipelines  # noqa: E402, F401  (an upward import: the lowest layers must not know the pipelines)\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")  # the very contract the real package is held to
    proc = lint_imports(tmp_path, pythonpath=tmp_path / "src")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"{CONTRACT} BROKEN" in out, out
    assert f"{low} -> synthmed.pipelines" in out, out


def _cycles(graph) -> list[list[str]]:
    """Strongly connected groups of 2+ modules in the import graph (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_module_imports_itself_through_others():
    """No import cycles (lazy imports inside functions count; imports for type checking only do not)."""
    import grimp

    graph = grimp.build_graph("synthmed", cache_dir=None, exclude_type_checking_imports=True)
    assert _cycles(graph) == []
    graph.add_import(importer="synthmed.core.io", imported="synthmed.pipelines.run")  # the check itself finds one
    assert any("synthmed.core.io" in group for group in _cycles(graph))
