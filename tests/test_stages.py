"""The stage registry and the pipeline's order, reuse and resume, with stub stages: no training (fast)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from training import registry
from training.config import load_recipe
from training.pipeline import run_pipeline
from training.registry import STAGES, StageSpec
from training.stages import Stage

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_circle_in_training() -> None:
    """Module-level imports between training modules form no cycle (runners import lazily)."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "training").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("training"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("training")}
        graph[name] = deps

    def visit(node: str, trail: list[str]) -> None:
        assert node not in trail, f"import circle: {' -> '.join([*trail, node])}"
        for dep in graph.get(node, ()):
            visit(dep, [*trail, node])

    for module in graph:
        visit(module, [])


class _Calls(list):
    def __init__(self) -> None:
        super().__init__()
        self.fail: set[str] = set()


@pytest.fixture
def stubs(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    """Every stage replaced by a stub that records its run; ``fail`` makes one crash once."""
    calls = _Calls()
    fail = calls.fail

    def make(name: str):
        def run(stage: Stage, work: Path, recipe: object) -> None:
            calls.append(name)
            (stage.partial / "out.txt").write_text(name)
            if name in fail:
                fail.discard(name)
                raise RuntimeError(f"{name} crashed")
            stage.finish({})

        return run

    table = {n: StageSpec(n, make(n), s.holds_model) for n, s in STAGES.items()}
    monkeypatch.setattr(registry, "STAGES", table)
    monkeypatch.setattr("training.pipeline.STAGES", table)
    return calls


def test_stages_run_in_registry_order_then_are_reused(stubs: _Calls, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "training" / "recipes" / "ci.yaml")
    run_pipeline(recipe, tmp_path, log=lambda _: None)
    assert stubs == list(STAGES)
    stubs.clear()
    result = run_pipeline(recipe, tmp_path, log=lambda _: None)
    assert stubs == [] and result.reused == list(STAGES)


def test_a_changed_section_rebuilds_its_stage_and_everything_after(stubs: _Calls, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "training" / "recipes" / "ci.yaml")
    run_pipeline(recipe, tmp_path, log=lambda _: None)
    stubs.clear()
    changed = load_recipe(ROOT / "training" / "recipes" / "ci.yaml", ["dpo.beta=0.2"])
    run_pipeline(changed, tmp_path, log=lambda _: None)
    assert stubs == ["dpo", "gptq", "eval"]


def test_a_crash_resumes_at_the_stage_that_crashed(stubs: _Calls, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "training" / "recipes" / "ci.yaml")
    stubs.fail.add("dpo")
    with pytest.raises(RuntimeError, match="dpo crashed"):
        run_pipeline(recipe, tmp_path, log=lambda _: None)
    assert not Stage(tmp_path, "dpo").done() and Stage(tmp_path, "dpo").partial.exists()
    stubs.clear()
    result = run_pipeline(recipe, tmp_path, log=lambda _: None)
    assert stubs == ["dpo", "gptq", "eval"] and result.reused == ["base", "evidence", "sft"]


def test_until_stops_after_the_named_stage(stubs: _Calls, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "training" / "recipes" / "ci.yaml")
    run_pipeline(recipe, tmp_path, until="sft", log=lambda _: None)
    assert stubs == ["base", "evidence", "sft"]
