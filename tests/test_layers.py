"""Imports point one way: no module of decoct imports itself back, and no layer imports a higher one.

The graph is built from the source with ``ast`` (no import runs): every ``import`` and ``from ...
import`` of a ``decoct`` module, including the lazy ones inside functions, relative imports
resolved. ``from decoct.pkg import name`` is an edge to ``decoct.pkg.name`` when that is a module,
else to ``decoct.pkg``. A package's ``__init__`` counts as the module named by the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "decoct"

# (layer, module prefixes), bottom to top: a module may import its own layer and the ones below.
# A prefix names a module and everything under it; a module belongs to its longest prefix.
LAYERS: list[tuple[str, list[str]]] = [
    ("runtime", ["decoct", "decoct.runtime"]),
    ("data", ["decoct.data"]),
    ("models", ["decoct.models"]),
    ("augment", ["decoct.augment"]),
    ("formats", ["decoct.formats"]),
    ("report", ["decoct.report", "decoct.frontier"]),
    ("train", ["decoct.train"]),
    ("methods", ["decoct.methods"]),
    ("coreset", ["decoct.coreset"]),
    ("families", ["decoct.matching", "decoct.decoupled"]),
    ("evaluation", ["decoct.evaluation"]),
    ("api", ["decoct.api", "decoct.plan"]),
    ("cli", ["decoct.cli"]),
]
FAMILIES = ["decoct.matching", "decoct.decoupled"]
"""Families share a layer and never import each other."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """The decoct modules ``path`` imports (edges), and the imports that name no module (errors)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: set[str] = set()
    unknown: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name == "decoct" or a.name.startswith("decoct.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod != "decoct" and not mod.startswith("decoct."):
                continue
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t not in known:
                unknown.append(f"{name} (line {node.lineno}) imports {t}, which is no module of decoct")
            elif t != name:
                edges.add(t)
    return edges, unknown


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    out, errors = {}, []
    for name, path in mods.items():
        out[name], bad = imports_of(name, path, known)
        errors += bad
    assert not errors, "\n".join(errors)
    return out


def layer_of(name: str) -> int:
    best, layer = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > len(best) and (p != "decoct" or name == p):
                best, layer = p, i
    return layer


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)) is not None:
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)) is not None:
            return c
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) < 0]
    assert not missing, f"modules in no layer of LAYERS: {missing}"


def test_imports_point_down():
    upward = []
    for name, deps in sorted(graph().items()):
        here = layer_of(name)
        for d in sorted(deps):
            if layer_of(d) > here:
                upward.append(f"{name} ({LAYERS[here][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_every_exported_name_exists():
    """``__all__`` names only what the module has (a moved function leaves no dangling export)."""
    import importlib

    missing = []
    for name in modules():
        if name.endswith(".__main__"):  # runs the command line when imported
            continue
        mod = importlib.import_module(name)
        missing += [f"{name}.{n}" for n in getattr(mod, "__all__", ()) if not hasattr(mod, n)]
    assert not missing, f"exported but absent: {missing}"


def test_families_do_not_import_each_other():
    def family(name: str) -> str | None:
        return next((f for f in FAMILIES if name == f or name.startswith(f + ".")), None)

    crossing = [f"{n} imports {d}" for n, deps in sorted(graph().items()) for d in sorted(deps)
                if family(n) and family(d) and family(n) != family(d)]
    assert not crossing, "\n".join(crossing)


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path):
    pkg = tmp_path / "decoct"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from decoct.sub import a\n")
    known = {"decoct", "decoct.sub", "decoct.sub.a", "decoct.sub.b"}
    g = {"decoct": set(), "decoct.sub": set(),
         "decoct.sub.a": imports_of("decoct.sub.a", pkg / "sub" / "a.py", known)[0],
         "decoct.sub.b": imports_of("decoct.sub.b", pkg / "sub" / "b.py", known)[0]}
    assert g["decoct.sub.a"] == {"decoct.sub.b"} and g["decoct.sub.b"] == {"decoct.sub.a"}
    assert find_cycle(g) == ["decoct.sub.a", "decoct.sub.b", "decoct.sub.a"]
