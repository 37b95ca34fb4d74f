"""No import circles in erf_lab/, fastconv/ and app/: the import graph is built from the source with ``ast``.

Every import counts, at module level or inside a function (a lazy import that closes a circle still ties the
two modules together), as do ``importlib.import_module("literal")`` calls. A package's ``__init__`` is not a
node: importing ``a.b`` runs ``a/__init__`` first by construction, and an import of the package itself is
resolved to the submodule it names when there is one. ``app/`` modules import each other by bare name today
(``import loaders``, with app/ on ``sys.path``) and as ``app.loaders`` once app/ is a package: both map to the
same node.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGES = ("erf_lab", "fastconv", "app")


def module_files(root: Path, tops=PACKAGES) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` under ``root/<top>`` (packages under their own name)."""
    mods = {}
    for top in tops:
        for p in sorted((root / top).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Dotted names a module's source imports anywhere (absolute; relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def import_graph(root: Path, tops=PACKAGES) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the project's own modules (package ``__init__`` files left out)."""
    mods = module_files(root, tops)
    app_top = {n.split(".")[1] for n in mods if n.startswith("app.")}

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        if path.name == "__init__.py":
            continue
        package = mod.rpartition(".")[0]
        targets = set()
        for name in imported_names(ast.parse(path.read_text(encoding="utf-8"), str(path)), package):
            if mod.startswith("app.") and name.split(".")[0] in app_top:
                name = "app." + name  # bare-name import of a sibling app/ module
            t = resolve(name)
            if t and t != mod and mods[t].name != "__init__.py":
                targets.add(t)
        graph[mod] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_detector_finds_lazy_relative_and_bare_app_circles(tmp_path):
    root = _tree(tmp_path, {
        "erf_lab/__init__.py": "from erf_lab.a import x\n",  # __init__ faces are not nodes
        "erf_lab/a.py": "def f():\n    from .sub import b\n",  # lazy and relative
        "erf_lab/sub/__init__.py": "",
        "erf_lab/sub/b.py": "import erf_lab.c\n",
        "erf_lab/c.py": "from erf_lab import a\n",  # closes a -> sub.b -> c -> a
        "erf_lab/d.py": "import importlib\nimportlib.import_module('erf_lab.e')\n",
        "erf_lab/e.py": "from erf_lab.d import *\n",  # d <-> e through import_module
        "fastconv/__init__.py": "",
        "fastconv/ok.py": "import erf_lab.a\nimport os\n",  # one-way: no circle
        "app/ui.py": "def need():\n    import loaders\n",
        "app/loaders.py": "from app.ui import need\n",  # bare name one way, package name the other
        "app/views/page.py": "import loaders\nfrom ui import need\n",
    })
    g = import_graph(root)
    assert g["app.views.page"] == {"app.loaders", "app.ui"} and g["fastconv.ok"] == {"erf_lab.a"}
    assert circles(g) == [["app.loaders", "app.ui"], ["erf_lab.a", "erf_lab.c", "erf_lab.sub.b"],
                          ["erf_lab.d", "erf_lab.e"]]
    (root / "erf_lab" / "c.py").write_text("import os\n")
    (root / "app" / "ui.py").write_text("def need():\n    pass\n")
    assert circles(import_graph(root)) == [["erf_lab.d", "erf_lab.e"]]


def test_project_has_no_import_circles():
    graph = import_graph(REPO_ROOT)
    assert len(graph) > 50 and "erf_lab.shape_bias.evaluate" in graph  # the walk found the project
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_graph_of_a_known_module():
    """Module-level and lazy imports of a real file (plotting imports analysis and io inside functions)."""
    assert import_graph(REPO_ROOT)["erf_lab.shape_bias.plotting"] == {
        "erf_lab.errors", "erf_lab.io", "erf_lab.shape_bias.analysis", "erf_lab.shape_bias.categories",
        "erf_lab.shape_bias.consistency", "erf_lab.shape_bias.download", "erf_lab.shape_bias.stimuli",
        "erf_lab.provenance"}
