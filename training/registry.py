"""The training stages, once: their order, what each runs, and which hold a model.

The CLI (``--until``), the pipeline, evaluation and publishing all read this
mapping. Each runner imports its module when it runs, so importing the registry
is cheap and no training module imports another in a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.config import Recipe
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


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("base", _base, holds_model=True),
        StageSpec("evidence", _evidence, holds_model=False),
        StageSpec("sft", _sft, holds_model=True),
        StageSpec("dpo", _dpo, holds_model=True),
        StageSpec("gptq", _gptq, holds_model=True),
        StageSpec("eval", _eval, holds_model=False),
    )
}
MODEL_STAGES: tuple[str, ...] = tuple(name for name, spec in STAGES.items() if spec.holds_model)


def published_stage(recipe: Recipe) -> str:
    """The stage whose model is published: GPTQ's, or DPO's when quantization is off."""
    return "gptq" if recipe.quantize.enabled else "dpo"
