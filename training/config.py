"""The typed recipe: one YAML file per experiment, with command-line overrides.

Every section refuses unknown keys, so a typo in a recipe is an error naming
the key rather than a silently ignored setting; every number has its bounds and
the rules between fields (a block longer than the model's positions, a width
GPTQ cannot group) are checked here, before hours of training, in one line that
names the keys. Sections are named ``*Section`` so they never shadow the
library classes they configure (TRL's ``SFTConfig``, GPTQModel's ``QuantizeConfig``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PosInt = Annotated[int, Field(gt=0)]
LearningRate = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
Epochs = Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


def digest(*parts: object) -> str:
    """The one hashing helper: a short sha256 of JSON-serialisable parts (pydantic models by value)."""
    values = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    # one part is hashed bare, several as a list: the form every published key and fingerprint has
    blob = json.dumps(values[0] if len(values) == 1 else values, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _switch(default: bool = True) -> Any:
    # left out of the dump while on, so adding the switch changed no existing stage key
    return Field(default, exclude_if=lambda v: v is default)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuildSection(_Section):
    """The embedded default base: tokenizer and a small Llama trained from scratch."""

    vocab_size: int = Field(8192, ge=512, le=262144)
    hidden_size: PosInt = 384
    num_layers: PosInt = 6
    num_heads: PosInt = 6
    intermediate_size: PosInt = 1024
    max_position_embeddings: int = Field(1024, ge=64)
    block_size: int = Field(512, ge=16)
    steps: PosInt = 2000
    batch_size: PosInt = 16
    lr: LearningRate = 3e-3
    warmup_steps: int = Field(100, ge=0)
    weight_decay: Fraction = 0.1
    medquad_docs: PosInt | None = None
    checkpoint_every: PosInt = 100

    @model_validator(mode="after")
    def _shape(self) -> BuildSection:
        if self.block_size > self.max_position_embeddings:
            raise ValueError(
                f"block_size ({self.block_size}) must be at most max_position_embeddings ({self.max_position_embeddings})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self


class BaseSection(_Section):
    path: str | None = Field(None, min_length=1)  # an HF-format folder; None builds the embedded default
    build: BuildSection = Field(default_factory=BuildSection)


class DataSection(_Section):
    # at least two rows: mismatched DPO negatives need another case to borrow from
    train_rows: int | None = Field(None, ge=2)  # None: the whole MedText train split
    eval_rows: int | None = Field(None, ge=2)  # None: the whole held-out split


class EvidenceSection(_Section):
    """Retrieval-augmented training: each example's prompt carries the evidence block that
    app.clinical.evidence retrieves for it (never its own case), exactly as the service will."""

    enabled: bool = False
    k: int = Field(3, ge=1, le=10)
    max_tokens: int = Field(256, ge=16, le=4096)
    medquad_docs: int | None = Field(None, ge=1, description="None: all of MedQuAD")


class SFTSection(_Section):
    enabled: bool = _switch()  # false: the base goes straight to DPO (the paper's setup)
    epochs: Epochs = 3.0
    lr: LearningRate = 5e-4
    batch_size: PosInt = 8
    grad_accum: PosInt = 1
    max_length: int = Field(512, ge=16)
    warmup_ratio: Fraction = 0.05
    weight_decay: Fraction = 0.0
    save_steps: PosInt = 100


class DPOSection(_Section):
    negatives: Literal["space", "mismatched", "sampled"] = "mismatched"
    # which other case's answer a mismatched pair rejects: the BM25-nearest
    # case (hardest) or a seeded random one (another topic altogether)
    mismatch: Literal["nearest", "shuffled"] = "nearest"
    beta: float = Field(0.1, gt=0, le=10, allow_inf_nan=False)
    lr: LearningRate = 5e-5
    epochs: Epochs = 1.0
    batch_size: PosInt = 4
    grad_accum: PosInt = 1
    max_length: int = Field(512, ge=16)
    optimizer: str = "adamw_torch"
    # weight of an NLL term on the chosen answer (RPO): keeps logps/chosen from
    # collapsing while the margin grows (likelihood displacement)
    rpo_alpha: float = Field(1.0, ge=0, allow_inf_nan=False)
    sample_max_new_tokens: PosInt = 128
    save_steps: PosInt = 100
    # pairs from clinicians' feedback (`python -m training preferences`), added to the built pairs; left out
    # of the dump while unset, so adding it changed no existing stage key
    feedback_pairs: str | None = Field(None, exclude_if=lambda v: v is None)


class QuantizeSection(_Section):
    enabled: bool = True
    bits: Literal[4, 8] = 4
    group_size: Literal[-1, 32, 64, 128] = 128
    sym: bool = True
    desc_act: bool = False
    calibration_rows: PosInt = 128


class EvaluateSection(_Section):
    batch_size: PosInt = 8
    samples: int = Field(5, ge=0)
    sample_max_new_tokens: PosInt = 160


class Recipe(_Section):
    name: str
    description: str = ""
    seed: int = 1234
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    base: BaseSection = Field(default_factory=BaseSection)
    data: DataSection = Field(default_factory=DataSection)
    evidence: EvidenceSection = Field(default_factory=EvidenceSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)

    @model_validator(mode="after")
    def _fits_the_model(self) -> Recipe:
        """Rules between sections, where the embedded base's shape is known here."""
        if self.base.path is not None:
            return self  # an external base's shape is checked when it is loaded
        build = self.base.build
        for section in ("sft", "dpo"):
            length = getattr(self, section).max_length
            if length > build.max_position_embeddings:
                raise ValueError(
                    f"{section}.max_length ({length}) must be at most base.build.max_position_embeddings "
                    f"({build.max_position_embeddings})"
                )
        q = self.quantize
        if q.enabled and q.group_size > 0:
            for name in ("hidden_size", "intermediate_size"):
                width = getattr(build, name)
                if width % q.group_size:
                    raise ValueError(
                        f"base.build.{name} ({width}) must be a multiple of quantize.group_size ({q.group_size}): "
                        "GPTQ quantizes every linear layer's input in whole groups"
                    )
        return self

    def fingerprint(self) -> str:
        """Hash of the resolved recipe: stage folders from another recipe are not reused."""
        return digest(self)


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
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown recipe key {key!r}")
            else:
                problems.append(f"{key}: {msg}" if key else msg)
        raise RecipeError(f"recipe {path}: " + "; ".join(problems)) from None
