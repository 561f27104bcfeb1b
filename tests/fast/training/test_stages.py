"""The stage registry and the pipeline's order, reuse and resume, with stub stages: no training (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from training import registry
from training.config import load_recipe
from training.pipeline import run_pipeline
from training.registry import STAGES, StageSpec
from training.stages import Stage


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


def test_stage_keys_from_the_graph_are_the_keys_stages_were_built_with() -> None:
    """The graph derives each key; the keys of existing stages are unchanged (the formula they were
    built with before the graph, written out here), so no work folder is rebuilt by the refactor."""
    from training.config import digest
    from training.pipeline import data_digest, stage_keys

    for recipe_name in ("ci.yaml", "default.yaml", "paper.yaml"):
        recipe = load_recipe(ROOT / "training" / "recipes" / recipe_name)
        data = data_digest()
        base = digest(recipe.base, recipe.data.train_rows, recipe.seed, data)
        evidence = digest(recipe.evidence, recipe.data.train_rows, data)
        sft = digest(base, evidence, recipe.sft, recipe.dtype)
        dpo = digest(sft, recipe.dpo)
        gptq = digest(dpo, recipe.quantize)
        evaluate = digest(gptq, recipe.evaluate, recipe.data.eval_rows)
        before = {"base": base, "evidence": evidence, "sft": sft, "dpo": dpo, "gptq": gptq, "eval": evaluate}
        assert stage_keys(recipe) == before
        assert list(stage_keys(recipe)) == list(STAGES)
