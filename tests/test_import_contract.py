"""The dependency contract: imports run down the layers, and no two modules import each other (directly or not).

Every module of ``src/personaxis`` is parsed with ``ast``; every ``import`` counts, those inside functions included
(only those under ``if TYPE_CHECKING:`` are left out: they never run). Imports of third-party packages are not
checked; a lazy import of one inside a function is how heavy optional dependencies stay optional (vllm, ray,
matplotlib, fastapi, sklearn, …) and is allowed anywhere. A lazy import of a personaxis module is allowed too (the
CLI keeps ``--help`` fast that way), but it counts like any other: it must run down the layers and close no cycle.

Layers, lowest first (a module may import its own layer or any lower one):

- ``base``: validation, progress bars, threads, the packaged catalogue, CPU kernels;
- ``engine``: models, the one hook mechanism, chat templates and spans, generation (module or package: one node),
  activations, capture, intervention operators;
- ``core``: the method as tensor functions — axis, vectors, persona space, traits, capping, steering, monitoring,
  guard mode's switching rule (``personaxis/guard.py``, on main since the guard branch);
- ``io``: every file format — the run layout and records, tensor files, the reference ``.pt`` and GGUF formats, atomic
  writes, the report;
- ``orchestration``: settings, the pipeline and its derived stages, calibration on a run, backends, Ray, judges,
  importing reference runs;
- ``evaluation``: the evaluations;
- ``adapters``: the CLI, its commands, the web app, the web guard's evaluation (it drives the app), the package root.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "personaxis"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "validate",
            "progress",
            "threads",
            "data",
            "kernels",
            "compiled_gemm",
            "int8_linears",
            "decode_attention",
            "layer_selection",
            "options",
        ),
    ),
    ("engine", ("models", "hooks", "chat", "generation", "activations", "capture", "interventions")),
    ("core", ("axis", "vectors", "space", "traits", "capping", "steering", "monitor", "guard")),
    ("io", ("io", "store", "interop", "report")),
    (
        "orchestration",
        ("settings", "pipeline", "derive", "calibration", "backends", "distributed", "judges", "reference_run"),
    ),
    ("evaluation", ("evals",)),
    ("adapters", ("cli", "commands", "web", "evals.guard", "")),
)
# Modules (or packages) that count as one node: the generation package is being split by job, its parts are one.
ONE_NODE = ("generation",)


# --------------------------------------------------------------------------------------------------- the checker
def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Module name → file, for every module of ``package`` under ``root``."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, source: str, modules: Iterable[str], package: str = PACKAGE) -> set[str]:
    """The modules of ``package`` that ``module`` imports, at any depth of its code except ``if TYPE_CHECKING:``."""
    known = set(modules)
    is_package = module in known and any(m.startswith(module + ".") for m in known)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    target = resolve(alias.name)
                    if target:
                        found.add(target)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if not (name == package or name.startswith(package + ".")):
                return
            for alias in node.names:
                target = resolve(f"{name}.{alias.name}") if f"{name}.{alias.name}" in known else resolve(name)
                if target:
                    found.add(target)

    Visitor().visit(ast.parse(source))
    found.discard(module)
    return found


def node_of(module: str, package: str = PACKAGE, one_node: Iterable[str] = ONE_NODE) -> str:
    for name in one_node:
        full = f"{package}.{name}"
        if module == full or module.startswith(full + "."):
            return full
    return module


def import_graph(root: Path, package: str = PACKAGE, one_node: Iterable[str] = ONE_NODE) -> dict[str, set[str]]:
    """Module → the modules it imports (nodes of ``one_node`` merged)."""
    files = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        source = path.read_text(encoding="utf-8")
        node = node_of(module, package, one_node)
        targets = {node_of(t, package, one_node) for t in imports_of(module, source, files, package)}
        graph.setdefault(node, set()).update(targets - {node})
    return graph


def layer_of(module: str, layers: Iterable[tuple[str, tuple[str, ...]]], package: str = PACKAGE) -> int | None:
    """The index of the module's layer: the longest matching prefix wins (``evals.guard`` over ``evals``)."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            full = f"{package}.{prefix}" if prefix else package
            if module == full or (prefix and module.startswith(full + ".")):
                if best is None or len(full) > best[1]:
                    best = (index, len(full))
    return None if best is None else best[0]


def wrong_way_imports(
    graph: Mapping[str, set[str]], layers: tuple[tuple[str, tuple[str, ...]], ...], package: str = PACKAGE
) -> list[str]:
    """Imports from a lower layer to a higher one, and modules no layer names."""
    problems = []
    names = [name for name, _ in layers]
    for module in sorted(graph):
        own = layer_of(module, layers, package)
        if own is None:
            problems.append(f"{module}: in no layer; add it to LAYERS")
            continue
        for target in sorted(graph[module]):
            other = layer_of(target, layers, package)
            if other is not None and other > own:
                problems.append(f"{module} ({names[own]}) imports {target} ({names[other]})")
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ------------------------------------------------------------------------------------------------------ the tests
def test_imports_run_down_the_layers() -> None:
    problems = wrong_way_imports(import_graph(SRC), LAYERS)
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_no_module_imports_itself_through_others() -> None:
    found = cycles(import_graph(SRC))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "personaxis" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


SYNTHETIC_LAYERS = (("core", ("axis",)), ("io", ("io",)), ("orchestration", ("pipeline",)), ("adapters", ("", "cli")))


def _synthetic(tmp_path: Path, axis_source: str) -> dict[str, set[str]]:
    return import_graph(
        _write_package(
            tmp_path,
            {
                "__init__.py": "",
                "axis.py": axis_source,
                "io/__init__.py": "",
                "io/files.py": "from personaxis.axis import Axis\n",
                "pipeline.py": "from personaxis.io import files\nfrom . import axis\n",
                "cli.py": "def main():\n    from personaxis.pipeline import run\n",
            },
        )
    )


def test_the_contract_holds_on_a_package_that_keeps_it(tmp_path: Path) -> None:
    graph = _synthetic(
        tmp_path, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from personaxis.pipeline import P\n"
    )
    assert graph["personaxis.cli"] == {"personaxis.pipeline"}  # an import inside a function counts
    assert graph["personaxis.pipeline"] == {"personaxis.io.files", "personaxis.axis"}  # relative imports resolve
    assert graph["personaxis.axis"] == set()  # TYPE_CHECKING imports never run: left out
    assert wrong_way_imports(graph, SYNTHETIC_LAYERS) == [] and cycles(graph) == []


@pytest.mark.parametrize(
    "wrong",
    [
        "from personaxis.io.files import save\n",  # core → io, at module level
        "def load():\n    from personaxis.io import files\n",  # the same, hidden inside a function
        "import personaxis.pipeline\n",  # core → orchestration, plain import
    ],
)
def test_a_wrong_way_import_breaks_the_contract(tmp_path: Path, wrong: str) -> None:
    graph = _synthetic(tmp_path, wrong)
    assert any(p.startswith("personaxis.axis (core) imports") for p in wrong_way_imports(graph, SYNTHETIC_LAYERS))
    assert any("personaxis.axis" in c for c in cycles(graph))  # io (and pipeline) import axis: a cycle too


def test_a_cycle_within_one_layer_breaks_the_contract(tmp_path: Path) -> None:
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "axis.py": "def f():\n    from personaxis import space\n",
            "space.py": "import personaxis.axis\n",
        },
    )
    graph = import_graph(root)
    assert wrong_way_imports(graph, (("core", ("axis", "space")), ("api", ("",)))) == []
    assert cycles(graph) == [["personaxis.axis", "personaxis.space"]]


def test_a_module_in_no_layer_is_reported(tmp_path: Path) -> None:
    graph = _synthetic(tmp_path, "")
    problems = wrong_way_imports(graph, (("core", ("axis",)), ("adapters", ("cli",))))
    assert "personaxis.pipeline: in no layer; add it to LAYERS" in problems


def test_generation_counts_as_one_node_module_or_package(tmp_path: Path) -> None:
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "generation/__init__.py": "from personaxis.generation.engine import run\n",
            "generation/engine.py": "from personaxis.generation import sampling\n",
            "generation/sampling.py": "",
        },
    )
    assert import_graph(root) == {"personaxis": set(), "personaxis.generation": set()}
