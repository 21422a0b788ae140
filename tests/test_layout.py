"""The house's layering, read from the source: no import circles; Prefect only at the edge."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("labtune", "tasks", "flows")
# the modules whose job is Prefect (or, for the CLI, starting flows): nothing else in labtune/ imports it
PREFECT_EDGE = {"labtune.ops.server", "labtune.ops.stack", "labtune.console", "labtune.cli", "labtune.cli.common",
                "labtune.cli.pipeline", "labtune.cli.models", "labtune.cli.ops", "labtune.cli.__main__"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module this one imports, at the top or inside a function (a lazy import still counts)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(path, name, set(known)) if m in known and m != name} for name, path in known.items()}


def test_no_import_circles():
    edges = graph()
    # packages import their own modules lazily (labtune.stages.run_until); a package's __init__ is
    # not a cycle with its children, so those edges are left out
    edges = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_prefect_only_at_the_edge_and_no_import_upwards():
    known = modules()
    for name, path in known.items():
        used = imports(path, name, set(known))
        if name.startswith("labtune") and name not in PREFECT_EDGE:
            assert not any(m == "prefect" or m.startswith("prefect.") for m in used), f"{name} imports Prefect"
            assert not any(m.split(".")[0] in ("tasks", "flows") for m in used), f"{name} imports tasks/ or flows/"
        if name.startswith("tasks"):
            assert not any(m.split(".")[0] == "flows" for m in used), f"{name} imports flows/"
    # only the CLI's run and sweep commands reach flows/, through labtune.ops.server.using_api
    for name in (n for n in known if n == "labtune.cli" or n.startswith("labtune.cli.")):
        cli = imports(known[name], name, set(known))
        assert not any(m == "prefect" or m.startswith("prefect.") for m in cli), f"{name} imports Prefect"


def test_the_benchmarks_import_no_prefect():
    """The benchmarks time stage logic; bench/gpu_pool.py alone measures the flow through Prefect's
    work pools, which is its purpose."""
    known = modules()
    for path in sorted((REPO / "bench").glob("*.py")):
        if path.stem == "gpu_pool":
            continue
        used = imports(path, f"bench.{path.stem}", set(known))
        assert not any(m.split(".")[0] in ("prefect", "tasks", "flows") for m in used), f"{path.name} reaches Prefect"


ROOMS = ("store", "models", "data", "training", "evaluation", "ops")


def allowed_imports(room: str) -> set[str]:
    """The labtune modules a room's `__init__.py` docstring says it may import ("May import: ...")."""
    doc = ast.get_docstring(ast.parse((REPO / "labtune" / room / "__init__.py").read_text())) or ""
    line = next((ln for ln in doc.splitlines() if ln.startswith("May import:")), None)
    assert line is not None, f"labtune/{room}/__init__.py: no 'May import:' line in its docstring"
    return set(re.findall(r"\blabtune(?:\.\w+)+", line))


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_what_its_docstring_allows(room):
    known = modules()
    allowed = allowed_imports(room)
    assert all(a in known for a in allowed), f"labtune/{room}: May import names a module that does not exist"
    for name, path in known.items():
        if not name.startswith(f"labtune.{room}"):
            continue
        for used in imports(path, name, set(known)):
            if not used.startswith("labtune.") or used.startswith(f"labtune.{room}"):
                continue  # the room itself, or the package face (its version)
            assert any(used == a or used.startswith(a + ".") for a in allowed), \
                f"{name} imports {used}; labtune/{room}/__init__.py allows {sorted(allowed)}"


def test_the_top_level_modules_below_the_rooms_import_none_of_them():
    """errors, overrides, precision and plots are the ground floor: every room may use them, so they
    use no room."""
    known = modules()
    for name in ("labtune.errors", "labtune.overrides", "labtune.precision", "labtune.plots"):
        used = {m for m in imports(known[name], name, set(known)) if m.startswith("labtune.") and m != "labtune.errors"}
        assert not used, f"{name} imports {sorted(used)}"


def test_docs_development_names_every_module():
    """docs/development.md's list is where a newcomer looks first: a module missing there is lost."""
    text = (REPO / "docs" / "development.md").read_text()
    stages = {"weights", "delta", "data", "tokenize", "train", "evaluate"}
    for path in sorted((REPO / "labtune").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if path.name == "__init__.py" and path.parent.name not in ("stages", "cli") or (path.parent.name == "stages" and path.stem in stages):
            continue
        assert relative in text, f"docs/development.md does not name {relative}"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def test_no_module_over_500_lines_and_no_function_over_60_in_the_library():
    """A newcomer reads a module in one sitting and a function on one screen."""
    for path in sorted((REPO / "labtune").rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(REPO)
        assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{where}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{where}:{node.lineno} {node.name}: {length} lines"


def test_the_store_knows_every_stage_output_folder_in_graph_order():
    from labtune.stages import STAGES
    from labtune.store.housekeeping import STAGES as OUTPUT_FOLDERS

    # baseline: the base model's answers, an output the evaluate stage builds before its own
    assert tuple(s for s in OUTPUT_FOLDERS if s != "baseline") == STAGES
    assert OUTPUT_FOLDERS.index("baseline") == OUTPUT_FOLDERS.index("evaluate") - 1
