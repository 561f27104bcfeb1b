"""What each stage of ``training.graph`` runs.

Each runner imports its module when it runs, so importing the registry is cheap; no stage module
imports the registry (they read ``training.graph``), so there is no circle, lazy imports included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.config import Recipe
from training.graph import GRAPH, STAGE_NAMES
from training.stages import Stage


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[[Stage, Path, Recipe], None]  # (this stage, the work folder, the recipe)
    holds_model: bool  # evaluation scores it; publishing may take its weights


def _base(stage: Stage, work: Path, recipe: Recipe) -> None:
    if recipe.base.path:
        path = Path(recipe.base.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base.path {path} is not a Hugging Face model folder (no config.json there)")
        stage.begin()
        (stage.partial / "BASE_PATH").write_text(str(path.resolve()))  # used in place, not copied
        stage.finish({"external": str(path.resolve())})
        return
    from training.base import build_base

    build_base(stage, recipe.base.build, recipe.seed, recipe.data.train_rows)


def _evidence(stage: Stage, work: Path, recipe: Recipe) -> None:
    from training.evidence import run_evidence_stage

    run_evidence_stage(stage, recipe)


def _sft(stage: Stage, work: Path, recipe: Recipe) -> None:
    from training.sft import run_sft

    run_sft(stage, Stage(work, "base"), recipe)


def _dpo(stage: Stage, work: Path, recipe: Recipe) -> None:
    from training.dpo import run_dpo

    run_dpo(stage, Stage(work, "sft").final, recipe)


def _gptq(stage: Stage, work: Path, recipe: Recipe) -> None:
    if not recipe.quantize.enabled:
        stage.begin()
        stage.finish({"skipped": True, "reason": "quantize.enabled is false: the DPO model is published"})
        return
    from training.quantize import run_quantize

    run_quantize(stage, Stage(work, "dpo").final, recipe)


def _eval(stage: Stage, work: Path, recipe: Recipe) -> None:
    from training.evaluate import run_evaluate

    run_evaluate(stage, work, recipe)


RUNNERS: dict[str, Callable[[Stage, Path, Recipe], None]] = {
    "base": _base,
    "evidence": _evidence,
    "sft": _sft,
    "dpo": _dpo,
    "gptq": _gptq,
    "eval": _eval,
}
assert tuple(RUNNERS) == STAGE_NAMES, "every stage of the graph has a runner, in the graph's order"
STAGES: dict[str, StageSpec] = {n.name: StageSpec(n.name, RUNNERS[n.name], n.holds_model) for n in GRAPH}
