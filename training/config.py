"""The typed recipe: one YAML file per experiment, with command-line overrides.

Every section refuses unknown keys, so a typo in a recipe is an error naming
the key rather than a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuildConfig(_Section):
    """The embedded default base: tokenizer and a small Llama trained from scratch."""

    vocab_size: int = 8192
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 6
    intermediate_size: int = 1024
    max_position_embeddings: int = 1024
    block_size: int = 512
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    medquad_docs: int | None = None
    checkpoint_every: int = 100


class BaseConfig(_Section):
    path: str | None = None  # an HF-format folder; None builds the embedded default
    build: BuildConfig = Field(default_factory=BuildConfig)


class DataConfig(_Section):
    train_rows: int | None = None  # None: the whole MedText train split
    eval_rows: int | None = None  # None: the whole held-out split


class EvidenceConfig(_Section):
    """Retrieval-augmented training: each example's prompt carries the evidence block that
    app.evidence retrieves for it (never its own case), exactly as the service will."""

    enabled: bool = False
    k: int = Field(3, ge=1, le=10)
    max_tokens: int = Field(256, ge=16, le=4096)
    medquad_docs: int | None = Field(None, ge=1, description="None: all of MedQuAD")


class SFTConfig(_Section):
    epochs: float = 3.0
    lr: float = 5e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    save_steps: int = 100


class DPOConfig(_Section):
    negatives: Literal["space", "mismatched", "sampled"] = "mismatched"
    # which other case's answer a mismatched pair rejects: the BM25-nearest
    # case (hardest) or a seeded random one (another topic altogether)
    mismatch: Literal["nearest", "shuffled"] = "nearest"
    beta: float = 0.1
    lr: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    optimizer: str = "adamw_torch"
    # weight of an NLL term on the chosen answer (RPO): keeps logps/chosen from
    # collapsing while the margin grows (likelihood displacement)
    rpo_alpha: float = 1.0
    sample_max_new_tokens: int = 128
    save_steps: int = 100


class QuantizeConfig(_Section):
    enabled: bool = True
    bits: Literal[4, 8] = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    calibration_rows: int = 128


class EvaluateConfig(_Section):
    batch_size: int = 8
    samples: int = 5
    sample_max_new_tokens: int = 160


class Recipe(_Section):
    name: str
    description: str = ""
    seed: int = 1234
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    base: BaseConfig = Field(default_factory=BaseConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def fingerprint(self) -> str:
        """Hash of the resolved recipe: stage folders from another recipe are not reused."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class RecipeError(ValueError):
    """A recipe that cannot be used, with a message naming the offending key."""


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r} must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {dotted!r}: {key!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {assignment!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(exc, "problem", None) or exc).strip()


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply ``section.key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping")
    for assignment in overrides or []:
        _apply_override(data, assignment)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown recipe key {key!r}")
            else:
                problems.append(f"{key}: {err['msg']}")
        raise RecipeError(f"recipe {path}: " + "; ".join(problems)) from None
