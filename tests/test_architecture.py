"""The import rules of docs/architecture.md, checked on the source.

Every import in audience_sync/ is parsed with ``ast``, those inside functions and under
``TYPE_CHECKING`` included: a lazy import is still a dependency. A module's *stage* is its first
name under the package (``audience_sync.state.store`` is in ``state``, ``audience_sync.diff`` in
``diff``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from pathlib import Path

import pytest
from conftest import REPO
from recording_destination import BatchRecordingDestination, RecordingDestination
from slow_destination import SlowJsonlDestination

from audience_sync.destinations import Destination, destination_class, kinds
from audience_sync.state.schema import metadata

PACKAGE = REPO / "audience_sync"

#: Modules every stage may import: they read no input and keep no state.
FOUNDATION = {
    "errors",
    "model",
    "naming",
    "durations",
    "arrowtext",
    "repeats",
    "drivers",
    "logs",
    "clock",
    "messageids",
    "scratch",
}

#: The pipeline's stages, which the config describes and so must not import.
STAGES = (
    "sources diff planning pushdown safeguards changes delivery destinations state engine "
    "retirement"
)

#: stage -> (the stages or modules it must not import, why): see docs/architecture.md.
RULES = {
    "sources": (
        "diff planning pushdown changes delivery engine retirement state destinations",
        "loading and validating a snapshot leans on no later stage",
    ),
    "diff": (
        "sources state destinations planning pushdown changes delivery engine config",
        "the diff is pure: ids in, a Plan out, no I/O",
    ),
    "state": (
        "destinations sources diff planning pushdown changes delivery engine retirement",
        "state stores what the engine confirmed; it names no destination and plans nothing",
    ),
    "destinations": (
        "engine delivery planning pushdown diff changes sources config track state.schema "
        "state.store state.audiences state.runs state.retries",
        "a destination takes updates and confirms them, knowing nothing of how they were "
        "planned, and owns its tables",
    ),
    "config": (STAGES, "the config describes the stages; it sits below them"),
}

#: Imports that break a rule today, each to be dropped when its fix lands (the test fails on an
#: exception that no longer occurs, so this list only shrinks).
KNOWN_EXCEPTIONS = {
    # The config validates `[destination]` with the destination's own settings model, found
    # through the registry (issue 12: config sits above the stage it configures).
    ("audience_sync.config", "audience_sync.destinations"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "audience_sync"


@functools.cache
def imports(module: str) -> frozenset[str]:
    """The package's modules that ``module`` imports (``from a import b`` is ``a.b`` when that
    is a module, else ``a``)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return frozenset(name for name in found if name in MODULES)


EDGES = {(importer, imported) for importer in MODULES for imported in imports(importer)}


def broken(edge: tuple[str, str]) -> str | None:
    """Why the import ``edge`` breaks a rule, or None."""
    importer, imported = edge
    names = {stage(imported), imported.removeprefix("audience_sync.")}  # a rule names either
    if stage(imported) == "cli" and stage(importer) != "cli":  # cli/'s modules share shared.py
        return "nothing imports the CLI: it is a thin shell over the library"
    if stage(importer) in FOUNDATION and stage(imported) not in FOUNDATION:
        return "a foundation module imports only foundation modules"
    forbidden, why = RULES.get(stage(importer), ("", ""))
    return why if names & set(forbidden.split()) else None


def test_the_parser_sees_the_imports() -> None:
    assert "audience_sync.state.bulk" in imports("audience_sync.state.store")  # in a function
    assert "audience_sync.pushdown" in imports("audience_sync.planning")  # a submodule by name
    assert "audience_sync.engine" in imports("audience_sync")  # under TYPE_CHECKING
    assert {stage(m) for m in MODULES} >= {"sources", "diff", "state", "destinations", "cli"}


def test_imports_follow_the_rules() -> None:
    broken_rules = [
        f"{importer} imports {imported}: {why}"
        for importer, imported in sorted(EDGES - KNOWN_EXCEPTIONS)
        if (why := broken((importer, imported)))
    ]
    assert broken_rules == []


def test_known_exceptions_are_still_there() -> None:
    """An exception whose import is gone was fixed: drop it from KNOWN_EXCEPTIONS."""
    assert {e for e in KNOWN_EXCEPTIONS if broken(e)} == KNOWN_EXCEPTIONS & EDGES
    assert KNOWN_EXCEPTIONS <= EDGES, KNOWN_EXCEPTIONS - EDGES


def test_the_architecture_page_places_every_stage() -> None:
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    placed = set(re.findall(r"`([a-z_]+)(?:/|\.py)?`", page))
    assert {stage(m) for m in MODULES} - {"audience_sync"} <= placed


def test_no_module_imports_itself_through_others() -> None:
    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(imports(start))
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(imports(module))
        return seen

    assert [m for m in MODULES if m in reachable(m)] == []


def test_the_state_parts_sit_below_the_store() -> None:
    """``state/store.py`` is a facade over the state's parts, and ``ledger`` sits above it: a
    part importing either would make the facade the only way in (and risk a cycle)."""
    above = {"audience_sync.state.store", "audience_sync.state.ledger", "audience_sync.state"}
    parts = [m for m in MODULES if stage(m) == "state" and m not in above]
    assert {"audience_sync.state.audiences", "audience_sync.state.runs"} <= set(parts)
    assert {(m, i) for m in parts for i in imports(m) if i in above} == set()


def test_state_declares_only_its_own_tables() -> None:
    # A destination declares its own (destinations.table_metadata()).
    assert [name for name in metadata.tables if not name.startswith("sync_")] == []


DESTINATIONS = [
    *(destination_class(kind) for kind in kinds()),
    RecordingDestination,
    BatchRecordingDestination,
    SlowJsonlDestination,
]


@pytest.mark.parametrize("cls", DESTINATIONS, ids=lambda c: c.__name__)
def test_declared_capabilities_match_the_methods(cls: type[Destination]) -> None:
    """A destination declares what it can do (the engine trusts the declaration); here, and
    only here, the declaration is checked against what it implements."""

    def implements(method: str) -> bool:
        return inspect.getattr_static(cls, method) is not inspect.getattr_static(
            Destination, method
        )

    assert cls.takes_batches == implements("deliver_batches")
    assert cls.prices_plans == implements("describe_plan")


def test_every_package_ships_in_the_wheel() -> None:
    """pyproject.toml lists the packages by hand: a new one left out breaks `pip install .`
    (the console script cannot import it) while an editable install still works."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()
