"""The stage graph, declared once: each stage's inputs (the stages it reads) and its own settings.

A stage's key is the digest of its inputs' keys and its settings, so a change anywhere upstream
rebuilds it and everything after it. The pipeline's order, the CLI's ``--until``, evaluation (which
stages hold a model) and publishing (which stage's model is published) all read this table. Pure:
no stage's code is imported here (``training.registry`` maps names to runners).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from training.config import Recipe, digest


@dataclass(frozen=True)
class Node:
    name: str
    inputs: tuple[str, ...]  # stages whose output this one reads (their keys are part of its key)
    settings: Callable[[Recipe, str], tuple[Any, ...]]  # (recipe, data digest) -> what else its output depends on
    holds_model: bool  # evaluation scores it; publishing may take its weights


GRAPH: tuple[Node, ...] = (
    # the base model: built from scratch (seeded, sized by the recipe) or an external folder
    Node("base", (), lambda r, data: (r.base, r.data.train_rows, r.seed, data), holds_model=True),
    # the evidence pack, built from the vendored sources (the train split's cases only)
    Node("evidence", (), lambda r, data: (r.evidence, r.data.train_rows, data), holds_model=False),
    Node("sft", ("base", "evidence"), lambda r, data: (r.sft, r.dtype), holds_model=True),
    Node("dpo", ("sft",), lambda r, data: (r.dpo, *_file_digest(r.dpo.feedback_pairs)), holds_model=True),
    Node("gptq", ("dpo",), lambda r, data: (r.quantize,), holds_model=True),
    Node("eval", ("gptq",), lambda r, data: (r.evaluate, r.data.eval_rows), holds_model=False),
)
NODES: dict[str, Node] = {n.name: n for n in GRAPH}
STAGE_NAMES: tuple[str, ...] = tuple(NODES)
MODEL_STAGES: tuple[str, ...] = tuple(n.name for n in GRAPH if n.holds_model)


def keys(recipe: Recipe, data: str) -> dict[str, str]:
    """Every stage's key, in order (each input comes before the stages that read it)."""
    out: dict[str, str] = {}
    for node in GRAPH:
        out[node.name] = digest(*(out[i] for i in node.inputs), *node.settings(recipe, data))
    return out


def published_stage(recipe: Recipe) -> str:
    """The stage whose model is published: GPTQ's, or DPO's when quantization is off."""
    return "gptq" if recipe.quantize.enabled else "dpo"


def _file_digest(path: str | None) -> tuple[str, ...]:
    """A feedback pairs file's content in the dpo key (nothing when there is none: old keys unchanged)."""
    if path is None:
        return ()
    from pathlib import Path

    from app.manifest import sha256_file

    return (sha256_file(Path(path)),)
