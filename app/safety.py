"""Red-flag triage and scope: a deterministic layer that holds whatever model is behind it.

Runs on the question *before* generation. The rules are data (``safety_rules.yaml``
beside this file, or ``MEDASK_SAFETY_RULES``): concepts are phrase patterns
matched on spaCy tokens (a blank English pipeline, no model download);
presentations fire when every concept of one of their combinations is mentioned
*affirmed and current*. Negated, historical and hypothetical mentions are found
with NegEx/ConText as implemented by negspacy (one component per context kind,
each with its own termset), so "denies chest pain", "a PE two years ago" and
"what are the symptoms of a heart attack" do not fire.

Emergency and crisis advice is fixed text owned by the rules (with the
deployment's numbers filled in); the model never writes or sees it.
Pure Python: no FastAPI import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RULES_PATH = Path(__file__).with_name("safety_rules.yaml")
Level = Literal["emergency", "crisis", "urgent", "routine"]
# higher first: the response's level is the most severe flag's
SEVERITY: dict[str, int] = {"emergency": 3, "crisis": 2, "urgent": 1, "routine": 0}
PREFIX_LEVELS = ("emergency", "crisis")
CONTEXT_KINDS = ("negated", "historical", "hypothetical")
_GAPS = {"~": 4, "~~": 8}


class SafetyRulesError(ValueError):
    """The rule file cannot be used; the message names the file and the problem."""


# ---- the rule file's schema ---------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContextTerms(_Strict):
    preceding: list[str] = Field(default_factory=list)
    following: list[str] = Field(default_factory=list)
    pseudo: list[str] = Field(default_factory=list)
    termination: list[str] = Field(default_factory=list)


class Presentation(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    name: str = Field(min_length=1)
    level: Literal["emergency", "crisis", "urgent"]
    any_of: list[list[str]] = Field(min_length=1)
    advice: str = Field(min_length=1)


class Scope(_Strict):
    refusal: str = Field(min_length=1)
    off_topic: list[str] = Field(min_length=1)
    medical: list[str] = Field(min_length=1)


class RuleFile(_Strict):
    version: str = Field(min_length=1)
    levels: dict[Literal["emergency", "crisis", "urgent"], str]
    context: dict[Literal["negated", "historical", "hypothetical"], ContextTerms]
    concepts: dict[str, list[str]]
    presentations: list[Presentation] = Field(min_length=1)
    scope: Scope
    # concepts that count in any grammatical mood: asking *how* to die is itself the risk
    always_current: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> RuleFile:
        for level in ("emergency", "crisis", "urgent"):
            if level not in self.levels:
                raise ValueError(f"levels.{level} is missing")
        ids = [p.id for p in self.presentations]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate presentation ids: {', '.join(dupes)}")
        for p in self.presentations:
            for combo in p.any_of:
                if not combo:
                    raise ValueError(f"presentation {p.id}: an empty combination fires on everything")
                unknown = [c for c in combo if c not in self.concepts]
                if unknown:
                    raise ValueError(f"presentation {p.id}: unknown concept(s) {', '.join(unknown)}")
        unknown = [c for c in self.always_current if c not in self.concepts]
        if unknown:
            raise ValueError(f"always_current: unknown concept(s) {', '.join(unknown)}")
        for name, phrases in self.concepts.items():
            if not phrases:
                raise ValueError(f"concept {name} has no phrases")
        return self


# ---- what triage returns -------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    id: str
    name: str
    level: str
    advice: str

    def public(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "level": self.level, "advice": self.advice}


@dataclass(frozen=True)
class Triage:
    level: str
    flags: tuple[Flag, ...]
    rules_version: str
    in_scope: bool = True
    prefix: str = ""  # fixed advice that goes before any model text (emergency, crisis)
    concepts: tuple[str, ...] = field(default=(), compare=False)

    def public(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "flags": [f.public() for f in self.flags],
            "rules_version": self.rules_version,
            "in_scope": self.in_scope,
            "advice": self.prefix or None,
        }


# ---- the layer -------------------------------------------------------------------


class SafetyLayer:
    """Loaded once at start; ``triage`` is cheap and thread-safe (spaCy's blank pipeline)."""

    def __init__(self, rules: RuleFile, emergency_number: str, crisis_line: str, source: Path) -> None:
        import negspacy.negation  # noqa: F401  (registers the 'negex' factory)
        import spacy
        from spacy.matcher import Matcher

        self.rules = rules
        self.version = rules.version
        self.source = source
        self.numbers = {"emergency_number": emergency_number, "crisis_line": crisis_line}
        self.refusal = rules.scope.refusal
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        for kind in CONTEXT_KINDS:
            nlp.add_pipe(
                "negex",
                name=f"context_{kind}",
                config={
                    "neg_termset": _termset(kind, rules.context.get(kind, ContextTerms())),
                    "extension_name": f"medask_{kind}",
                    "span_keys": ["medask"],
                },
            )
        self.nlp = nlp
        self.matcher = Matcher(nlp.vocab)
        for name, phrases in rules.concepts.items():
            self.matcher.add(name, [self._pattern(f"concepts.{name}", p) for p in phrases])
        self.off_topic = Matcher(nlp.vocab)
        self.off_topic.add("off_topic", [self._pattern("scope.off_topic", p) for p in rules.scope.off_topic])
        self.off_topic.add("medical", [self._pattern("scope.medical", p) for p in rules.scope.medical])
        self.level_advice = {k: self._fill(v) for k, v in rules.levels.items()}

    @classmethod
    def load(cls, path: Path | None = None, emergency_number: str = "911", crisis_line: str = "988") -> SafetyLayer:
        """Read and validate a rule file; every problem is a SafetyRulesError naming the file."""
        path = Path(path or RULES_PATH)
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
            rules = RuleFile.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise SafetyRulesError(f"safety rule file {path}: {key}: {err['msg']}") from None
        try:
            return cls(rules, emergency_number, crisis_line, path)
        except (ValueError, re.error) as exc:
            raise SafetyRulesError(f"safety rule file {path}: {exc}") from None

    def _fill(self, text: str) -> str:
        return text.format(**self.numbers)

    def _pattern(self, owner: str, phrase: str) -> list[dict[str, Any]]:
        """One phrase of the rule file's syntax as a spaCy Matcher pattern."""
        tokens: list[dict[str, Any]] = []
        for word in phrase.split():
            if word in _GAPS:
                tokens.append({"TEXT": {"NOT_IN": [".", "!", "?", ";"]}, "OP": f"{{0,{_GAPS[word]}}}"})
            elif len(word) > 2 and word.startswith("/") and word.endswith("/"):
                try:
                    re.compile(word[1:-1])
                except re.error as exc:
                    raise ValueError(f"{owner}: phrase {phrase!r}: bad regular expression: {exc}") from None
                tokens.append({"LOWER": {"REGEX": f"^(?:{word[1:-1]})$"}})
            elif "|" in word:
                tokens.append({"LOWER": {"IN": [w.lower() for w in word.split("|") if w]}})
            elif word.endswith("*") and len(word) > 1:
                tokens.append({"LOWER": {"REGEX": f"^{re.escape(word[:-1].lower())}"}})
            else:
                tokens.extend({"LOWER": t.lower_} for t in self.nlp.tokenizer(word))
        if not tokens or all("OP" in t for t in tokens):
            raise ValueError(f"{owner}: phrase {phrase!r} matches nothing")
        return tokens

    def concepts(self, text: str) -> tuple[list[str], list[tuple[str, str]]]:
        """Affirmed, current concept ids in ``text``; and every mention with why it was set aside."""
        from spacy.tokens import Span

        doc = self.nlp.make_doc(text)
        spans = [Span(doc, start, end, label=label) for label, start, end in self.matcher(doc)]
        doc.spans["medask"] = spans
        for _, component in self.nlp.pipeline:
            doc = component(doc)
        found: set[str] = set()
        excluded: list[tuple[str, str]] = []
        for span in doc.spans["medask"]:
            kinds = ("negated",) if span.label_ in self.rules.always_current else CONTEXT_KINDS
            why = next((k for k in kinds if span._.get(f"medask_{k}")), None)
            if why is None:
                found.add(span.label_)
            else:
                excluded.append((span.label_, why))
        return sorted(found), excluded

    def triage(self, text: str) -> Triage:
        """The red flags in a question; out-of-scope questions are said so (never when a flag fires)."""
        found, _ = self.concepts(text)
        present = set(found)
        flags = tuple(
            Flag(p.id, p.name, p.level, self._fill(p.advice))
            for p in self.rules.presentations
            if any(all(c in present for c in combo) for combo in p.any_of)
        )
        level = max((f.level for f in flags), key=SEVERITY.__getitem__, default="routine")
        prefix_lines: list[str] = []
        for lvl in PREFIX_LEVELS:
            lvl_flags = [f for f in flags if f.level == lvl]
            if lvl_flags:
                prefix_lines.append(self.level_advice[lvl])
                prefix_lines.extend(f"- {f.name}: {f.advice}" for f in lvl_flags)
        in_scope = bool(flags) or not self._off_topic(text)
        return Triage(level, flags, self.version, in_scope, "\n".join(prefix_lines), tuple(found))

    def _off_topic(self, text: str) -> bool:
        doc = self.nlp.make_doc(text)
        labels = {self.nlp.vocab.strings[m] for m, _, _ in self.off_topic(doc)}
        return "off_topic" in labels and "medical" not in labels

    def info(self) -> dict[str, Any]:
        return {
            "rules_version": self.version,
            "rules_file": self.source.name,
            "presentations": len(self.rules.presentations),
            "concepts": len(self.rules.concepts),
            **self.numbers,
        }


def _termset(kind: str, extra: ContextTerms) -> dict[str, list[str]]:
    """negspacy's clinical termset for negation; ours alone for historical and hypothetical."""
    from negspacy.termsets import termset

    base = termset("en_clinical").get_patterns() if kind == "negated" else {}
    out: dict[str, list[str]] = {}
    for key, ours in (
        ("pseudo_negations", extra.pseudo),
        ("preceding_negations", extra.preceding),
        ("following_negations", extra.following),
        ("termination", extra.termination),
    ):
        merged = list(base.get(key, [])) + [t for t in ours if t not in base.get(key, [])]
        if kind == "negated" and key == "preceding_negations":
            # inability is a symptom here ("can't breathe"), never an absence
            merged = [t for t in merged if t not in ("cannot", "can't", "cant", "not demonstrate")]
        out[key] = merged
    return out


def compose(prefix: str, body: str) -> str:
    """The answer a client sees: fixed advice first, then whatever the model (or the gate) said."""
    return f"{prefix}\n\n{body}" if prefix else body
