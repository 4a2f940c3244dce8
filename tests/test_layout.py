"""The layout's rules, checked on the source: each module says its one job first, none grows past about
400 lines; the layers import only downwards (LAYERS), imports inside functions and under TYPE_CHECKING
included, and form no cycle; pipeline never imports Prefect; the names removed before a release
(CHANGELOG.md) are gone."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deeplab_common", "pipeline", "flows", "models")
MAX_LINES = 420
# The layers, bottom first: a module imports from its own layer and those below it, never from above.
LAYERS = (
    "deeplab_common",
    "models",
    "pipeline.io",
    "pipeline.crf",
    "pipeline.engine",
    "pipeline.ray",
    "pipeline.tools",
    "pipeline.cli",
    "flows",
)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Project modules ``path`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES}


def test_every_module_says_its_job_first_and_stays_small() -> None:
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{name}: no docstring saying its job"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{name}: {lines} lines"


def layer_of(name: str) -> int | None:
    """The index in LAYERS of the module ``name`` (its longest matching layer), None for package roots."""
    found = [i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")]
    return max(found) if found else None


def test_layers_import_only_downwards() -> None:
    upward = []
    for name, path in MODULES.items():
        own = layer_of(name)
        if own is None:
            continue
        for imported in sorted(_imports(path, top_level_only=False)):
            other = layer_of(imported)
            if other is not None and other > own:
                upward.append(f"{name} ({LAYERS[own]}) imports {imported} ({LAYERS[other]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_every_module_has_its_layer() -> None:
    assert not [name for name in MODULES if layer_of(name) is None and name != "pipeline"]


def test_the_engine_never_names_ray() -> None:
    """The engine chooses its compute backend by name (pipeline.engine.backends): nothing in it imports Ray or
    the Ray backend, not even lazily."""
    for path in (ROOT / "pipeline" / "engine").rglob("*.py"):
        text = path.read_text()
        assert "import ray" not in text and "pipeline.ray" not in text, path


def test_imports_have_no_cycle() -> None:
    """Not at module level, nor inside functions, nor under TYPE_CHECKING."""
    graph = {name: _imports(path, top_level_only=False) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycle = [*path[path.index(other) :], other]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_dependencies_point_one_way() -> None:
    for name, path in MODULES.items():
        imported = _imports(path, top_level_only=False)
        if name.startswith("pipeline"):
            assert not any(i.startswith("flows") for i in imported), f"{name} imports flows"
            tree = ast.parse(path.read_text())
            prefect = [
                n
                for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom)
                and any(
                    (getattr(n, "module", None) or alias.name).split(".")[0] == "prefect" for alias in n.names
                )
            ]
            assert not prefect, f"{name} imports Prefect: the engine never does"
        if name.startswith("models"):
            assert not any(i.startswith(("pipeline", "flows")) for i in imported), f"{name} imports upward"


# Module names removed before any release (CHANGELOG.md): no alias keeps them importable.
REMOVED_MODULES = (
    "pipeline._moved",
    "pipeline.sources",
    "pipeline.slides",
    "pipeline.tissue",
    "pipeline.publish",
    "pipeline.slide_publish",
    "pipeline.vectorize",
    "pipeline.regrid",
    "pipeline.areas",
    "pipeline.grid",
    "pipeline.preflight",
    "pipeline.stage",
    "pipeline.ledger",
    "pipeline.manifest",
    "pipeline.engine.crf",
    "pipeline.workers",
    "pipeline.segment",
    "pipeline.ray_engine",
    "pipeline.actor_pools",
    "pipeline.warm_actors",
    "pipeline.cluster_storage",
    "pipeline.local_cluster",
    "pipeline.evaluate",
    "pipeline.tune_crf",
    "pipeline.tune_tiling",
    "pipeline.slide_chips",
    "pipeline.progress",
    "flows.discover",
)


@pytest.mark.parametrize("name", REMOVED_MODULES)
def test_removed_module_names_fail_plainly(name: str) -> None:
    assert importlib.util.find_spec(name) is None, f"{name} still imports"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)
