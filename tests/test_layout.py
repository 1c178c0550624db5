"""The code's shape: no import circles, a training loop in short named phases, a thin CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "shardtune"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the shardtune modules it imports anywhere (top level, functions, TYPE_CHECKING).

    Importing ``a.b.c`` from outside package ``a.b`` runs ``a/b/__init__.py`` first: that edge counts
    too; a module importing its own package's siblings does not depend on the package's __init__."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = owner(name) if name.startswith("shardtune") else None
                while target and target != mod:
                    graph[mod].add(target)
                    target = target.rpartition(".")[0]
                    if mod.startswith(target + ".") or target not in modules:
                        break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = import_graph()
    assert graph["shardtune.training.loop"] >= {
        "shardtune.artifacts.checkpoint",
        "shardtune.training.fsdp",
        "shardtune.adapters.model",
    }
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    graph = import_graph()
    graph["shardtune.models.dtensor"].add("shardtune.recipe.schema")  # the circle an early layout had
    graph["shardtune.recipe.schema"].add("shardtune.adapters.model")
    assert any({"shardtune.models.dtensor", "shardtune.recipe.schema"} <= set(c) for c in cycles(graph))


# The layers, lowest first: a package may import its own modules and the packages before it.
LAYERS = ["core", "models", "adapters", "recipe", "data", "artifacts", "inspection", "training", "cli"]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (mod, target)
        for mod, targets in graph.items()
        for target in targets
        if layer_of(mod) is not None and layer_of(target) is not None and layer_of(target) > layer_of(mod)
    )


def test_the_folders_are_layers_and_imports_go_down():
    graph = import_graph()
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS)
    assert {p.name for p in PACKAGE.glob("*.py")} == {
        "__init__.py",
        "__main__.py",
    }  # no module outside a layer
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import" in doc, layer
    assert upward_imports(graph) == []


def test_the_layer_check_finds_an_upward_import():
    graph = import_graph()
    graph["shardtune.adapters.model"].add(
        "shardtune.training.fsdp"
    )  # the edge the DTensor helpers' move removed
    assert upward_imports(graph) == [("shardtune.adapters.model", "shardtune.training.fsdp")]


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "cli").glob("*.py")) + [PACKAGE / "training" / "loop.py"], ids=str
)
def test_no_long_functions_in_the_loop_or_the_cli(path):
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in functions(path) if f.end_lineno - f.lineno >= 80]
    assert long == []


def test_train_reads_as_named_phases_with_docstrings():
    """`train()` calls the Trainer's phases in the order the module docstring lists them; each phase,
    and the per-step and per-interval pieces, say what they do in a docstring."""
    import shardtune.training.loop as train_module

    source = (PACKAGE / "training" / "loop.py").read_text(encoding="utf-8")
    body = next(f for f in functions(PACKAGE / "training" / "loop.py") if f.name == "train")
    called = [
        n.func.attr
        for n in ast.walk(body)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        if n.func.value.id == "trainer"
    ]
    phases = [
        "run_directory",
        "read_data",
        "setup_model",
        "setup_data",
        "start_run",
        "setup_optimizer",
        "restore_or_score",
        "loop",
        "finish",
    ]
    assert called == phases
    doc = train_module.__doc__
    assert [doc.index(f"Trainer.{p}") for p in phases] == sorted(doc.index(f"Trainer.{p}") for p in phases)
    for name in [*phases, "train_step", "at_interval", "log_metrics", "save_checkpoint"]:
        method = getattr(train_module.Trainer, name)
        assert method.__doc__ and len(method.__doc__.strip().splitlines()) <= 3, name
    assert "def train_step" in source and "def at_interval" in source


def test_the_cli_only_parses_and_calls_the_library():
    """Command modules import no torch/transformers at module level (the library does the work)."""
    for path in (PACKAGE / "cli").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not {"torch", "transformers", "accelerate"} & {n.split(".")[0] for n in names}, path


def test_the_catalog_names_what_the_registries_hold():
    """Cheap listings and the recipe's checks read names from the catalog; the registries behind them
    (adapter classes, task generators) hold the same names in the same order."""
    from shardtune.adapters import METHODS
    from shardtune.core import catalog
    from shardtune.data.tasks import TASKS

    assert list(catalog.TASKS) == list(TASKS)
    assert all(TASKS[name].description == text for name, text in catalog.TASKS.items())
    assert list(catalog.METHODS) == list(METHODS)


def test_make_test_keeps_shared_work_on_one_worker():
    """The units make test's workers take whole: a docs page, the multi-node module, else one test."""
    from conftest import worker_group

    page = "tests/test_docs_commands.py::test_the_documented_commands_run[docs/getting-started.md:{}]"
    assert worker_group(page.format(25)) == worker_group(page.format(238)) == "docs:docs/getting-started.md"
    readme = "tests/test_docs_commands.py::test_the_documented_commands_run[README.md:55]"
    assert worker_group(readme) == "docs:README.md"
    multinode = "tests/test_multinode.py::test_nproc_is_per_machine"
    assert worker_group(multinode) == "tests/test_multinode.py"
    alone = "tests/test_cli.py::test_help_texts"
    assert worker_group(alone) == alone
