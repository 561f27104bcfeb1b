"""recipe -> data -> base -> evidence pack -> sft -> dpo -> quantize -> evaluate -> publish.

Each stage reads the previous stage's folder and writes its own under the
work folder; a stage is reused when its folder is complete and was made from
the same settings (its key), so a rerun resumes at the first missing stage.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from training import graph
from training.config import Recipe, digest
from training.registry import STAGES
from training.stages import Stage


def data_digest() -> str:
    """The data every stage reads: MedText, MedQuAD and the split. A change to any of them
    changes every stage's key, so nothing built from the old data is reused."""
    from app.manifest import sha256_file
    from training.data import MEDQUAD_PATH, MEDTEXT_PATH, SPLIT_PATH

    return digest(*(sha256_file(p) for p in (MEDTEXT_PATH, MEDQUAD_PATH, SPLIT_PATH)))


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Each stage's key covers the data, its own settings and every upstream stage's (``training.graph``)."""
    return graph.keys(recipe, data_digest())


@dataclass
class RunResult:
    work: Path
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)


def _stale(stage: Stage, key: str) -> bool:
    return stage.done() and stage.info().get("key") != key


def run_pipeline(
    recipe: Recipe,
    work: Path,
    until: str = "eval",
    log: Callable[[str], None] = print,
) -> RunResult:
    """Run (or resume) every stage up to ``until`` in ``work``."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, os.cpu_count() or 1)))
    work.mkdir(parents=True, exist_ok=True)
    keys = stage_keys(recipe)
    result = RunResult(work)
    upstream_rebuilt = False
    for name in STAGES:
        stage = Stage(work, name)
        if stage.done() and (upstream_rebuilt or _stale(stage, keys[name])):
            log(f"[{name}] settings changed: rebuilding this stage")
            shutil.rmtree(stage.final)
        if stage.partial.exists() and _partialdigest(stage) not in (None, keys[name]):
            log(f"[{name}] discarding a partial run made with other settings")
            shutil.rmtree(stage.partial)
        if stage.done():
            result.reused.append(name)
            log(f"[{name}] done already: {stage.final}")
        else:
            upstream_rebuilt = True
            stage.begin()
            (stage.partial / "STAGE_KEY").write_text(keys[name])
            t0 = time.time()
            STAGES[name].run(stage, work, recipe)
            _stampdigest(stage, keys[name], time.time() - t0)
            result.seconds[name] = round(time.time() - t0, 1)
            log(f"[{name}] finished in {result.seconds[name]:.0f}s")
        if name == until:
            break
    return result


def _partialdigest(stage: Stage) -> str | None:
    path = stage.partial / "STAGE_KEY"
    return path.read_text().strip() if path.is_file() else None


def _stampdigest(stage: Stage, key: str, seconds: float) -> None:
    info_path = stage.final / "STAGE_DONE.json"
    info = json.loads(info_path.read_text())
    info.update({"key": key, "seconds": round(seconds, 1)})
    info_path.write_text(json.dumps(info, indent=1, default=str))
