"""The package's import layering, read from the source with ``ast`` (nothing is imported).

The layers are the README's layer list; imports go one way only:

    rank 0  options.py, chunk_policy.py    leaves (chunk_policy may import options only)
    rank 1  ops/                           may import rank 0
    rank 1  torch_ops/, reference.py       may import rank 0 (not ops)
    rank 2  autograd/                      may import ranks 0-1
    rank 3  functional/                    may import ranks 0-2
    rank 4  modules.py                     may import ranks 0-3
    rank 5  integrations/                  may import ranks 0-4 and the package root
    tool    gpu_build.py                   may import ops' public names (and rank 0)

The package root ``gem_kernels/__init__.py`` (the public names) may import ranks 0-4, never the
integrations (``import gem_kernels`` must not import transformers).

Rules, each reported with file:line for every violation:
  rank        an import of a layer the importer's row does not allow (up a rank, or sideways
              between the two rank-1 rows);
  private     an underscore-prefixed module or name imported from another package or layer
              (inside one package of one layer, e.g. autograd/gem.py importing autograd/_scale.py,
              is fine; the top-level modules share a package but not a layer);
  cycle       an import cycle among gem_kernels modules, counting imports inside functions (a
              local import that only postpones a cycle is still one);
  late        a module-level import after the module's code has started, or any ``noqa: E402``
              (the usual way to break a cycle by importing at the end of a module);
  unknown     a module outside the table (a new top-level module must be given a row here and in
              the README's layer list).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gem_kernels"

# layer of each module: the first matching prefix of the dotted name wins (longest first below).
LAYER_OF_PREFIX = {
    "gem_kernels.options": "options",
    "gem_kernels.chunk_policy": "chunk_policy",
    "gem_kernels.ops": "ops",
    "gem_kernels.torch_ops": "torch",
    "gem_kernels.reference": "torch",
    "gem_kernels.autograd": "autograd",
    "gem_kernels.functional": "functional",
    "gem_kernels.modules": "modules",
    "gem_kernels.integrations": "integrations",
    "gem_kernels.gpu_build": "tool",
}
RANK0 = {"options", "chunk_policy"}
RANK1 = RANK0 | {"ops", "torch"}
# layers each layer may import, besides its own
ALLOWED = {
    "options": set(),
    "chunk_policy": {"options"},
    "ops": RANK0,
    "torch": RANK0,
    "autograd": RANK1,
    "functional": RANK1 | {"autograd"},
    "modules": RANK1 | {"autograd", "functional"},
    "root": RANK1 | {"autograd", "functional", "modules"},
    "integrations": RANK1 | {"autograd", "functional", "modules", "root"},
    "tool": RANK0 | {"ops"},
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    path: str  # file, relative to the repository root
    line: int
    target: str  # dotted module the statement loads (a submodule when a name is one)
    names: Tuple[str, ...]  # names taken from ``target`` (empty for ``import x``)
    local: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:`` (not run, so not part of a cycle)

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def what(self) -> str:
        names = f" import {', '.join(self.names)}" if self.names else ""
        return f"{'(function-local) ' if self.local else ''}from {self.target}{names}"


def module_files() -> Dict[str, Path]:
    """Dotted name -> file, for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> Optional[str]:
    if module == PACKAGE:
        return "root"
    for prefix in sorted(LAYER_OF_PREFIX, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYER_OF_PREFIX[prefix]
    return None


def package_of(module: str, modules: Dict[str, Path]) -> str:
    """The package a module belongs to: itself for a package's ``__init__``, else its parent."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, local: bool, type_only: bool):
    """Yield (import node, inside a function, under TYPE_CHECKING) for every import in ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local, type_only
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, True, type_only)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), local, True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), local, type_only)
        else:
            yield from _walk(child, local, type_only)


def parse_imports(modules: Dict[str, Path]) -> List[Import]:
    """Every import of a gem_kernels module by a gem_kernels module, relative ones resolved."""
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = package_of(module, modules)
        rel = str(path.relative_to(ROOT))
        for node, local, type_only in _walk(tree, False, False):
            entries = []  # (target module, names)
            if isinstance(node, ast.Import):
                entries = [(alias.name, ()) for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    # ``from pkg import submodule`` loads the submodule; other names come from pkg
                    entries.append((sub, ()) if sub in modules else (source, (alias.name,)))
            for target, names in entries:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found.append(Import(module, rel, node.lineno, target, names, local, type_only))
    # one record per (statement, target), names merged
    merged: Dict[Tuple[str, int, str], Import] = {}
    for imp in found:
        key = (imp.path, imp.line, imp.target)
        if key in merged:
            old = merged[key]
            imp = Import(old.importer, old.path, old.line, old.target, old.names + imp.names, old.local, old.type_only)
        merged[key] = imp
    return list(merged.values())


def rank_violations(imports: List[Import], modules: Dict[str, Path]) -> List[str]:
    out = []
    for module in modules:
        if layer_of(module) is None:
            out.append(f"{modules[module].relative_to(ROOT)}:1: module {module} is in no layer [unknown]")
    for imp in imports:
        src, dst = layer_of(imp.importer), layer_of(imp.target)
        if src is None or dst is None or src == dst or dst in ALLOWED[src]:
            continue
        out.append(f"{imp.where()}: {imp.what()}: layer {src} may not import layer {dst} [rank]")
    return out


def _private(dotted: str) -> bool:
    return any(
        part.startswith("_") and not (part.startswith("__") and part.endswith("__")) for part in dotted.split(".")
    )


def private_violations(imports: List[Import], modules: Dict[str, Path]) -> List[str]:
    out = []
    for imp in imports:
        if imp.target not in modules:
            out.append(f"{imp.where()}: {imp.what()}: no such module in the package [unknown]")
            continue
        # Inside one package and one layer private names are fine; the top-level modules share the
        # package gem_kernels but are separate layers (modules.py may not take reference._x).
        same_package = package_of(imp.importer, modules) == package_of(imp.target, modules)
        if same_package and layer_of(imp.importer) == layer_of(imp.target):
            continue
        private = [name for name in imp.names if _private(name)]
        if _private(imp.target):
            out.append(
                f"{imp.where()}: {imp.what()}: private module {imp.target} from another package or layer [private]"
            )
        elif private:
            out.append(
                f"{imp.where()}: {imp.what()}: private name(s) {', '.join(private)} from another package or layer "
                "[private]"
            )
    return out


def _ancestors(module: str) -> List[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(imports: List[Import], modules: Dict[str, Path]) -> Dict[str, Dict[str, Import]]:
    """module -> {module it loads: the statement}. Loading ``a.b.c`` also runs ``a`` and ``a.b``;
    those implicit edges are counted except to the importer's own packages (already running)."""
    graph: Dict[str, Dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.type_only or imp.target not in modules:
            continue
        own = set(_ancestors(imp.importer))
        for dst in [imp.target] + [a for a in _ancestors(imp.target) if a not in own]:
            if dst != imp.importer:
                graph[imp.importer].setdefault(dst, imp)
    return graph


def _strongly_connected(graph: Dict[str, Dict[str, Import]]) -> List[List[str]]:
    """Tarjan's algorithm, iterative; the components of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    comps = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def cycle_violations(imports: List[Import], modules: Dict[str, Path]) -> List[str]:
    graph = import_graph(imports, modules)
    out = []
    for comp in _strongly_connected(graph):
        members = set(comp)
        edges = sorted(
            {imp for src in comp for dst, imp in graph[src].items() if dst in members},
            key=lambda imp: (imp.path, imp.line),
        )
        for imp in edges:
            out.append(f"{imp.where()}: {imp.what()}: part of the import cycle {' <-> '.join(comp)} [cycle]")
    return out


def late_import_violations(modules: Dict[str, Path]) -> List[str]:
    """Module-level imports after the first statement that is not a docstring, an import, a dunder
    assignment or a conditional/try block (pycodestyle's E402), and every ``noqa: E402``."""
    out = []
    for path in modules.values():
        rel = path.relative_to(ROOT)
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(r"noqa:[^#]*\bE402\b", line):
                out.append(f"{rel}:{i}: '# noqa: E402' (an import placed late on purpose) [late]")
        tree = ast.parse(text, filename=str(path))
        started = None
        for k, stmt in enumerate(tree.body):
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                if started is not None:
                    out.append(f"{rel}:{stmt.lineno}: module-level import after code (line {started}) [late]")
                continue
            if k == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # docstring
            if isinstance(stmt, (ast.If, ast.Try, ast.With)):
                continue
            if isinstance(stmt, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id.startswith("__") and t.id.endswith("__") for t in stmt.targets
            ):
                continue
            if started is None:
                started = stmt.lineno
    return out


def all_violations() -> List[str]:
    modules = module_files()
    imports = parse_imports(modules)
    return (
        rank_violations(imports, modules)
        + private_violations(imports, modules)
        + cycle_violations(imports, modules)
        + late_import_violations(modules)
    )


def test_layering():
    violations = all_violations()
    assert not violations, (
        f"{len(violations)} layering violation(s) in {PACKAGE}/ (rules: tests/test_layers.py "
        f"docstring):\n" + "\n".join(violations)
    )


# --- the checker itself, on small made-up packages -------------------------------------------


def _fake_package(tmp_path, files: Dict[str, str], monkeypatch):
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    return all_violations()


def test_checker_passes_a_clean_package(tmp_path, monkeypatch):
    found = _fake_package(
        tmp_path,
        {
            "__init__.py": "from .functional import f\n",
            "options.py": "X = 1\n",
            "chunk_policy.py": "from .options import X\n",
            "ops/__init__.py": "from .k import launch\n",
            "ops/_common.py": "Y = 2\n",
            "ops/k.py": "from ..options import X\nfrom ._common import Y\ndef launch():\n    pass\n",
            "autograd/__init__.py": "",
            "autograd/_scale.py": "",
            "autograd/gem.py": "from . import _scale\ndef fwd():\n    from ..ops import launch\n",
            "functional/__init__.py": "from .gem import f\n",
            "functional/gem.py": "from ..autograd.gem import fwd\ndef f():\n    pass\n",
            "integrations/__init__.py": "",
            "integrations/hf.py": "from .. import f\nfrom ..modules import M\n",
            "modules.py": "from .functional import f\nM = 1\n",
            "gpu_build.py": "from .ops.k import launch\n",
        },
        monkeypatch,
    )
    assert found == []


def test_checker_finds_each_kind_of_violation(tmp_path, monkeypatch):
    found = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "options.py": "from .chunk_policy import Z\n",  # rank: options imports nothing
            "chunk_policy.py": "Z = 1\n",
            "ops/__init__.py": "",
            "ops/k.py": "def _kernel():\n    pass\n",
            "torch_ops/__init__.py": "",
            "torch_ops/t.py": "def g():\n    from ..ops.k import _kernel\n",  # rank (sideways) + private
            "functional/__init__.py": "",
            "functional/_checks.py": "def check():\n    from ..modules import M\n",  # rank, up, local
            "modules.py": "from .functional._checks import check\nfrom .reference import _t\nM = 1\n",  # private x2
            "reference.py": "def _t():\n    pass\n",
            "integrations/__init__.py": "",
            "integrations/a.py": "from .b import B\nA = 1\n",
            "integrations/b.py": "B = 1\nfrom .a import A  # noqa: E402\n",  # cycle + late (twice)
            "extra.py": "",  # unknown
        },
        monkeypatch,
    )
    text = "\n".join(found)
    expected = [
        "gem_kernels/options.py:1: from gem_kernels.chunk_policy import Z: layer options may not import layer "
        "chunk_policy [rank]",
        "gem_kernels/torch_ops/t.py:2: (function-local) from gem_kernels.ops.k import _kernel: layer torch may "
        "not import layer ops [rank]",
        "gem_kernels/torch_ops/t.py:2: (function-local) from gem_kernels.ops.k import _kernel: private name(s) "
        "_kernel from another package or layer [private]",
        "gem_kernels/functional/_checks.py:2: (function-local) from gem_kernels.modules import M: layer "
        "functional may not import layer modules [rank]",
        "gem_kernels/modules.py:1: from gem_kernels.functional._checks import check: private module "
        "gem_kernels.functional._checks from another package or layer [private]",
        "gem_kernels/modules.py:2: from gem_kernels.reference import _t: private name(s) _t from another package "
        "or layer [private]",
        "gem_kernels/integrations/b.py:2: '# noqa: E402' (an import placed late on purpose) [late]",
        "gem_kernels/integrations/b.py:2: module-level import after code (line 1) [late]",
        "gem_kernels/extra.py:1: module gem_kernels.extra is in no layer [unknown]",
    ]
    for line in expected:
        assert line in found, f"missing {line!r} in:\n{text}"
    cycles = [v for v in found if v.endswith("[cycle]")]
    assert any(v.startswith("gem_kernels/integrations/a.py:1:") for v in cycles), text
    assert any(v.startswith("gem_kernels/integrations/b.py:2:") for v in cycles), text
    # modules -> functional._checks -> (local) modules, and functional/__init__ is run on the way
    assert any(v.startswith("gem_kernels/modules.py:1:") for v in cycles), text
    assert any(v.startswith("gem_kernels/functional/_checks.py:2: (function-local)") for v in cycles), text
    assert len(found) == len(expected) + len(cycles), text
