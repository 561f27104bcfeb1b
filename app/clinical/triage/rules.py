"""The triage rule file's schema: validated at start, so a broken file is a clear error, never a gap.

The file (``app/clinical/safety_rules.yaml``) is a clinical artifact: versioned, reviewable without code,
every threshold with its source. It holds, per language, what people write (concepts as phrase
patterns, context cues for NegEx, texting forms, scope words, the fixed advice in that language),
and, for all languages, the findings (measurements with danger-zone thresholds) and the
presentations (general discriminators first, then named conditions) that fire on combinations
of concepts and findings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.clinical.triage.findings import MEASURES

LEVELS = ("emergency", "crisis", "urgent")


class SafetyRulesError(ValueError):
    """The rule file cannot be used; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContextTerms(_Strict):
    preceding: list[str] = Field(default_factory=list)
    following: list[str] = Field(default_factory=list)
    pseudo: list[str] = Field(default_factory=list)
    termination: list[str] = Field(default_factory=list)


class Scope(_Strict):
    refusal: str = Field(min_length=1)
    off_topic: list[str] = Field(min_length=1)
    medical: list[str] = Field(min_length=1)


class Wording(_Strict):
    name: str = Field(min_length=1)
    advice: str = Field(min_length=1)


class Language(_Strict):
    """What people write in one language, and what the service says back in it."""

    spacy: str = Field(min_length=2, description="spaCy blank pipeline code (tokenizer rules)")
    levels: dict[Literal["emergency", "crisis", "urgent"], str]
    negex_base: str | None = Field(None, description="negspacy termset extended by `context.negated`")
    context: dict[Literal["negated", "historical", "hypothetical"], ContextTerms]
    forms: dict[str, str] = Field(default_factory=dict, description="texting forms -> the words rules use")
    concepts: dict[str, list[str]]
    scope: Scope
    names: dict[str, Wording] = Field(default_factory=dict, description="presentation wording in this language")
    classifier_name: str = Field(min_length=1)
    classifier_advice: dict[Literal["emergency", "crisis"], str]
    note: str | None = Field(None, description="said to the reader in this language, e.g. the answer's language")
    markers: list[str] = Field(min_length=1, description="common words that identify the language")


class Finding(_Strict):
    """A measurement in a danger zone: fires when any value read is at or beyond the threshold."""

    measure: str
    at_least: float | None = None
    at_most: float | None = None
    adult_only: bool = Field(False, description="not applied when the question gives an age under 16")
    source: str = Field(min_length=3)

    @model_validator(mode="after")
    def _one_side(self) -> Finding:
        if self.measure not in MEASURES:
            raise ValueError(f"unknown measure {self.measure!r} (known: {', '.join(MEASURES)})")
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("give exactly one of at_least, at_most")
        return self


class Presentation(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    name: str = Field(min_length=1)
    level: Literal["emergency", "crisis", "urgent"]
    kind: Literal["discriminator", "condition"] = "condition"
    any_of: list[list[str]] = Field(min_length=1)
    advice: str = Field(min_length=1)
    source: str | None = None


class Classifier(_Strict):
    """The second signal: a linear model over word and character n-grams, trained at start."""

    examples: list[str] = Field(min_length=1, description="JSONL files of labelled questions, beside the rule file")
    emergency: float = Field(gt=0, lt=1, description="probability at or above which it flags")
    crisis: float = Field(gt=0, lt=1)


class RuleFile(_Strict):
    version: str = Field(min_length=1)
    languages: dict[str, Language] = Field(min_length=1)
    default_language: str
    findings: dict[str, Finding] = Field(default_factory=dict)
    presentations: list[Presentation] = Field(min_length=1)
    # concepts that count in any grammatical mood: asking *how* to die is itself the risk
    always_current: list[str] = Field(default_factory=list)
    metaphor_prone: list[str] = Field(default_factory=list)
    classifier: Classifier | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RuleFile:
        if self.default_language not in self.languages:
            raise ValueError(f"default_language {self.default_language!r} is not in languages")
        concepts = {c for lang in self.languages.values() for c in lang.concepts}
        ids = [p.id for p in self.presentations]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate presentation ids: {', '.join(dupes)}")
        clash = concepts & set(self.findings)
        if clash:
            raise ValueError(f"names used for both a concept and a finding: {', '.join(sorted(clash))}")
        for p in self.presentations:
            for combo in p.any_of:
                if not combo:
                    raise ValueError(f"presentation {p.id}: an empty combination fires on everything")
                unknown = [c for c in combo if c not in concepts and c not in self.findings]
                if unknown:
                    raise ValueError(f"presentation {p.id}: unknown concept(s) {', '.join(unknown)}")
        for key in ("always_current", "metaphor_prone"):
            unknown = [c for c in getattr(self, key) if c not in concepts]
            if unknown:
                raise ValueError(f"{key}: unknown concept(s) {', '.join(unknown)}")
        for code, lang in self.languages.items():
            for level in LEVELS:
                if level not in lang.levels:
                    raise ValueError(f"languages.{code}.levels.{level} is missing")
            for name, phrases in lang.concepts.items():
                if not phrases:
                    raise ValueError(f"languages.{code}.concepts.{name} has no phrases")
            unknown = sorted(set(lang.names) - set(ids))
            if unknown:
                raise ValueError(f"languages.{code}.names: unknown presentation(s) {', '.join(unknown)}")
        return self


def read(path: Path) -> RuleFile:
    """Read and validate a rule file; every problem is a SafetyRulesError naming the file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SafetyRulesError(f"safety rule file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise SafetyRulesError(f"safety rule file {path} is not UTF-8: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise SafetyRulesError(f"safety rule file {path} is not valid YAML{line}: {exc}") from None
    if not isinstance(raw, dict):
        raise SafetyRulesError(f"safety rule file {path} must be a mapping")
    try:
        return RuleFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise SafetyRulesError(f"safety rule file {path}: {key}: {err['msg']}") from None
