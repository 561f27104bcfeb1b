"""The layout's promises, checked: no import circle in app/ or training/ (imports inside functions
included), every app module under 450 lines and Serving under 300, and the clinical trip's steps each
in exactly one module. Fast: reads source, imports nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports, anywhere in its body."""
    modules = {_module(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if state.get(node) == 1:
            return [*trail[trail.index(node) :], node]
        if state.get(node) == 2:
            return None
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            found = visit(dep, [*trail, node])
            if found:
                return found
        state[node] = 2
        return None

    for module in sorted(graph):
        found = visit(module, [])
        if found:
            return found
    return None


@pytest.mark.parametrize("package", ["app", "training"])
def test_no_import_circle_lazy_imports_included(package: str) -> None:
    cycle = _cycle(_graph(package))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_app_module_over_450_lines_and_serving_under_300() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in (ROOT / "app").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 450} == {}
    assert sizes["app/serving.py"] < 300


def _defined_or_called(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "app").rglob("*.py") if rx.search(p.read_text()))


def test_each_step_of_the_trip_has_one_home() -> None:
    # triage is called by the clinic only; the quality gate is assessed there only; SSE is encoded in one place
    assert _defined_or_called(r"\.safety\.triage\(|safety_layer\.triage\(") == ["app/clinical/clinic.py"]
    assert _defined_or_called(r"^from app\.clinical\.quality import .*\bassess\b") == ["app/clinical/clinic.py"]
    assert _defined_or_called(r"data: \{|\"data: ") == ["app/api/streaming.py"]
    assert _defined_or_called(r"data: \[DONE\]") == ["app/api/streaming.py"]
    # sampling settings are built from the request models (and once for the warm-up), by keyword
    assert _defined_or_called(r"(?<!class )SamplingParams\(") == [
        "app/api/openai_schemas.py",
        "app/api/schemas.py",
        "app/serving.py",  # the warm-up generation
    ]
