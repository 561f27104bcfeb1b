"""Red-flag triage and scope: a deterministic layer that holds whatever model is behind it.

Runs on the question *before* generation, in four steps, each its own module under ``app/clinical/triage/``:

1. **Canonical text** (``text``): NFKC, invisible characters removed, whitespace collapsed; then
   folded (lower case, no accents) with texting forms expanded per language.
2. **Findings** (``findings``): vital signs, labs, age, pregnancy weeks and durations with their units,
   turned into named danger-zone findings by the rule file's thresholds (NEWS2, ESI, NICE, ADA...).
3. **Concepts** (``matchers``): phrase patterns per language on spaCy tokens (blank pipelines, no download), long
   words matched with a bounded edit distance (misspellings); negated, historical and hypothetical
   mentions set aside with NegEx/ConText (negspacy, one component per context kind and language).
   Presentations fire on combinations of concepts and findings: general discriminators (airway,
   breathing, shock, consciousness, haemorrhage, seizing, danger-zone vitals) first, then named
   conditions. Every language's phrases are matched whatever the detected language (fail-safe).
4. **A second, independent signal** (``classifier``): word and character n-grams, combined
   fail-safe: a level it flags that the rules did not is flagged, saying so.

Emergency and crisis advice is fixed text owned by the rules, in the question's language (``language``),
with the deployment's numbers filled in; the model never writes or sees it. Pure Python: no FastAPI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.clinical.triage import language as lang_detect
from app.clinical.triage.classifier import TriageClassifier, read_examples
from app.clinical.triage.findings import Findings, extract
from app.clinical.triage.matchers import Matchers
from app.clinical.triage.rules import ContextTerms, Language, RuleFile, SafetyRulesError, read
from app.clinical.triage.text import Speller, canonical, expand, fold

__all__ = ["RULES_PATH", "SafetyLayer", "SafetyRulesError", "Triage", "compose"]

RULES_PATH = Path(__file__).with_name("safety_rules.yaml")
# higher first: the response's level is the most severe flag's
SEVERITY: dict[str, int] = {"emergency": 3, "crisis": 2, "urgent": 1, "routine": 0}
PREFIX_LEVELS = ("emergency", "crisis")
CONTEXT_KINDS = ("negated", "historical", "hypothetical")
_GAPS = {"~": 4, "~~": 8}
_AUXILIARIES = ("do", "does", "did", "is", "was", "are", "were", "ca", "wo", "could", "would", "should", "have", "has")
DEFAULT_NUMBERS = {
    "en": {"emergency_number": "911", "crisis_line": "988 (call or text)"},
    "pt": {"emergency_number": "192 (SAMU)", "crisis_line": "188 (CVV)"},
}


@dataclass(frozen=True)
class Flag:
    id: str
    name: str
    level: str
    advice: str
    signal: str = "rules"  # "rules" (phrases and findings) or "classifier" (the second signal alone)

    def public(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "level": self.level, "advice": self.advice, "signal": self.signal}


@dataclass(frozen=True)
class Triage:
    level: str
    flags: tuple[Flag, ...]
    rules_version: str
    in_scope: bool = True
    prefix: str = ""  # fixed advice that goes before any model text (emergency, crisis)
    concepts: tuple[str, ...] = field(default=(), compare=False)
    language: str = "en"
    findings: dict[str, list[float]] = field(default_factory=dict, compare=False)
    note: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "flags": [f.public() for f in self.flags],
            "rules_version": self.rules_version,
            "in_scope": self.in_scope,
            "advice": self.prefix or None,
            "language": self.language,
            "findings": self.findings,
            "note": self.note,
        }


@dataclass(frozen=True)
class Assessment:
    """Each signal's flags apart, before they are combined."""

    language: str
    rules: tuple[Flag, ...]
    classifier: tuple[Flag, ...]
    findings: Findings
    present: frozenset[str]
    metaphor: bool  # an off-topic word and no medical one

    def level(self, signal: str) -> str:
        flags = self.rules if signal == "rules" else self.classifier
        return max((f.level for f in flags), key=SEVERITY.__getitem__, default="routine")


class _Pipeline:
    """One language's tokenizer, phrase matcher and NegEx/ConText components."""

    def __init__(self, code: str, spec: Language, always_current: set[str]) -> None:
        import negspacy.negation  # noqa: F401  (registers the 'negex' factory)
        import spacy

        self.code, self.spec, self.always_current = code, spec, always_current
        nlp = spacy.blank(spec.spacy)
        nlp.add_pipe("sentencizer")  # NegEx scopes end at sentence boundaries
        for kind in CONTEXT_KINDS:
            terms = spec.context.get(kind, ContextTerms())
            nlp.add_pipe(
                "negex",
                name=f"context_{kind}",
                config={
                    "neg_termset": _termset(kind, terms, spec.negex_base if kind == "negated" else None),
                    "extension_name": f"medask_{code}_{kind}",
                    "span_keys": ["medask"],
                },
            )
        self.nlp = nlp
        self.vocabulary: set[str] = set()
        self.matcher = Matchers(nlp.vocab)
        for name, phrases in spec.concepts.items():
            self.matcher.add(name, [self._pattern(f"languages.{code}.concepts.{name}", p) for p in phrases])
        self.scope = Matchers(nlp.vocab)
        self.scope.add(
            "off_topic", [self._pattern(f"languages.{code}.scope.off_topic", p) for p in spec.scope.off_topic]
        )
        self.scope.add("medical", [self._pattern(f"languages.{code}.scope.medical", p) for p in spec.scope.medical])
        self.forms = {fold(k): fold(v) for k, v in spec.forms.items()}
        self.speller = Speller(self.vocabulary)

    def _pattern(self, owner: str, phrase: str) -> list[dict[str, Any]]:
        """One phrase of the rule file's syntax as a spaCy Matcher pattern (on folded text)."""
        tokens: list[dict[str, Any]] = []
        for word in fold(phrase).split():
            if word in _GAPS:
                tokens.append({"TEXT": {"NOT_IN": [".", "!", "?", ";"]}, "OP": f"{{0,{_GAPS[word]}}}"})
            elif len(word) > 2 and word.startswith("/") and word.endswith("/"):
                try:
                    re.compile(word[1:-1])
                except re.error as exc:
                    raise ValueError(f"{owner}: phrase {phrase!r}: bad regular expression: {exc}") from None
                tokens.append({"LOWER": {"REGEX": f"^(?:{word[1:-1]})$"}})
            elif "|" in word:
                tokens.append({"LOWER": {"IN": [w for w in word.split("|") if w]}})
            elif word.endswith("*") and len(word) > 1:
                tokens.append({"LOWER": {"REGEX": f"^{re.escape(word[:-1])}"}})
            else:
                for t in self.nlp.tokenizer(word):
                    self.vocabulary.add(t.lower_)
                    tokens.append({"LOWER": t.lower_})
        if not tokens or all("OP" in t for t in tokens):
            raise ValueError(f"{owner}: phrase {phrase!r} matches nothing")
        return tokens

    def analyse(self, folded: str) -> tuple[set[str], list[tuple[str, str]], set[str], str]:
        """Affirmed concepts, mentions set aside (with why), the scope word lists used, and the text
        with the mentions set aside removed (what the classifier reads: it cannot see negation)."""
        from spacy.tokens import Span

        doc = self.nlp.make_doc(self.speller.correct(expand(folded, self.forms)))
        scope = {label for label, _, _ in self.scope(doc)}
        doc.spans["medask"] = [Span(doc, s, e, label=label) for label, s, e in self.matcher(doc)]
        for _, component in self.nlp.pipeline:
            doc = component(doc)
        found: set[str] = set()
        excluded: list[tuple[str, str]] = []
        hidden: set[int] = set()
        for span in doc.spans["medask"]:
            kinds = ("negated",) if span.label_ in self.always_current else CONTEXT_KINDS
            why = next((k for k in kinds if span._.get(f"medask_{self.code}_{k}")), None)
            if why is None:
                found.add(span.label_)
            else:
                excluded.append((span.label_, why))
                hidden.update(range(span.start, span.end))
        affirmed = "".join(t.text_with_ws for t in doc if t.i not in hidden) if hidden else doc.text
        return found, excluded, scope, affirmed


class SafetyLayer:
    """Loaded once at start; ``triage`` is cheap and thread-safe (spaCy's blank pipelines)."""

    def __init__(self, rules: RuleFile, numbers: dict[str, dict[str, str]], source: Path) -> None:
        self.rules = rules
        self.version = rules.version
        self.source = source
        self.numbers = numbers
        self.pipelines = {
            code: _Pipeline(code, spec, set(rules.always_current)) for code, spec in rules.languages.items()
        }
        self.default = rules.default_language
        self.classifier: TriageClassifier | None = None
        if rules.classifier is not None:
            examples = [e for name in rules.classifier.examples for e in read_examples(source.parent / name)]
            self.classifier = TriageClassifier([fold(canonical(e.text)) for e in examples], [e.label for e in examples])

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        emergency_number: str = "911",
        crisis_line: str = "988 (call or text)",
        numbers: dict[str, dict[str, str]] | None = None,
    ) -> SafetyLayer:
        """Read and validate a rule file; every problem is a SafetyRulesError naming the file.

        ``emergency_number``/``crisis_line`` are the default language's; ``numbers`` gives other
        languages' (``{"pt": {"emergency_number": "192", "crisis_line": "188"}}``)."""
        path = Path(path or RULES_PATH)
        rules = read(path)
        merged = {code: dict(DEFAULT_NUMBERS.get(code, DEFAULT_NUMBERS["en"])) for code in rules.languages}
        merged[rules.default_language] = {"emergency_number": emergency_number, "crisis_line": crisis_line}
        for code, given in (numbers or {}).items():
            merged.setdefault(code, {}).update(given)
        try:
            return cls(rules, merged, path)
        except (ValueError, re.error) as exc:
            raise SafetyRulesError(f"safety rule file {path}: {exc}") from None
        except OSError as exc:
            raise SafetyRulesError(f"safety rule file {path}: classifier examples: {exc}") from None

    # ---- the steps --------------------------------------------------------------
    def concepts(self, text: str, language: str | None = None) -> tuple[list[str], list[tuple[str, str]]]:
        """Affirmed, current concept ids in ``text``; and every mention set aside, with why."""
        found, excluded, _, _ = self._analyse(fold(canonical(text)), language or self.language(text))
        return sorted(found), excluded

    def _analyse(self, folded: str, primary: str) -> tuple[set[str], list[tuple[str, str]], set[str], str]:
        """Concepts of every language and the scope lists used.

        The question's own language decides context ("prevenção do suicídio" is educational); the
        other languages' phrases still count (a mixed or misdetected question is not missed),
        except for a concept that the question's language set aside."""
        found, excluded, scope, affirmed = self.pipelines[primary].analyse(folded)
        set_aside = {c for c, _ in excluded}
        for code, pipe in self.pipelines.items():
            if code != primary:
                other, _, other_scope, _ = pipe.analyse(folded)
                found |= other - set_aside
                scope |= other_scope
        return found, excluded, scope, affirmed

    def _findings(self, folded: str) -> tuple[Findings, set[str]]:
        """The measurements in a folded question and the rule file's findings they meet."""
        f = extract(folded)
        child = any(days < 16 * 365 for days in f.age_days)
        fired = set()
        for name, rule in self.rules.findings.items():
            if rule.adult_only and child:
                continue
            if any(
                (rule.at_least is not None and v >= rule.at_least) or (rule.at_most is not None and v <= rule.at_most)
                for v in f.values(rule.measure)
            ):
                fired.add(name)
        return f, fired

    def language(self, text: str) -> str:
        clean = canonical(text)
        return self._language(clean, fold(clean))

    def _language(self, clean: str, folded: str) -> str:
        markers = {code: spec.markers for code, spec in self.rules.languages.items()}
        return lang_detect.detect(clean.lower(), folded, markers, self.default)

    def assess(self, text: str) -> Assessment:
        """Both signals, apart: what the rules flag and what the classifier flags (the benchmark's view)."""
        clean = canonical(text)
        folded = fold(clean)
        code = self._language(clean, folded)
        found, _, labels, affirmed = self._analyse(folded, code)
        measured, fired = self._findings(folded)
        present = found | fired
        metaphor = "off_topic" in labels and "medical" not in labels
        # outside medicine, words like "bleeding" or "choking" are metaphors: they alone fire nothing
        counted = present - set(self.rules.metaphor_prone) if metaphor else present
        rules = [
            self._flag(code, p.id, p.name, p.level, p.advice)
            for p in self.rules.presentations
            if any(all(c in counted for c in combo) for combo in p.any_of)
        ]
        second: list[Flag] = []
        if self.classifier is not None and self.rules.classifier is not None and not metaphor:
            spec = self.rules.languages[code]
            probs = self.classifier.probabilities(affirmed)
            for level in PREFIX_LEVELS:
                if probs.get(level, 0.0) >= getattr(self.rules.classifier, level):
                    advice = self._fill(code, spec.classifier_advice[level])
                    second.append(Flag(f"classifier_{level}", spec.classifier_name, level, advice, "classifier"))
        return Assessment(code, tuple(rules), tuple(second), measured, frozenset(present), metaphor)

    def triage(self, text: str) -> Triage:
        """The red flags in a question; out-of-scope questions are said so (never when a flag fires).

        Fail-safe: a level the classifier flags that the rules did not is flagged too, saying so."""
        a = self.assess(text)
        spec = self.rules.languages[a.language]
        flags = list(a.rules) + [f for f in a.classifier if all(r.level != f.level for r in a.rules)]
        level = max((f.level for f in flags), key=SEVERITY.__getitem__, default="routine")
        prefix_lines: list[str] = []
        for lvl in PREFIX_LEVELS:
            lvl_flags = [f for f in flags if f.level == lvl]
            if lvl_flags:
                prefix_lines.append(self._fill(a.language, spec.levels[lvl]))
                prefix_lines.extend(f"- {f.name}: {f.advice}" for f in lvl_flags)
        return Triage(
            level,
            tuple(flags),
            self.version,
            bool(flags) or not a.metaphor,
            "\n".join(prefix_lines),
            tuple(sorted(a.present)),
            a.language,
            a.findings.public(),
            spec.note,
        )

    def refusal_for(self, triage: Triage) -> str:
        return self.rules.languages[triage.language].scope.refusal

    # ---- helpers ------------------------------------------------------------------
    def _flag(self, code: str, pid: str, name: str, level: str, advice: str) -> Flag:
        wording = self.rules.languages[code].names.get(pid)
        if wording is not None:
            name, advice = wording.name, wording.advice
        return Flag(pid, name, level, self._fill(code, advice))

    def _fill(self, code: str, text: str) -> str:
        return text.format(**self.numbers[code])

    def info(self) -> dict[str, Any]:
        return {
            "rules_version": self.version,
            "rules_file": self.source.name,
            "presentations": len(self.rules.presentations),
            "concepts": len({c for s in self.rules.languages.values() for c in s.concepts}),
            "findings": len(self.rules.findings),
            "languages": sorted(self.rules.languages),
            "classifier": self.classifier is not None,
            **self.numbers[self.default],
            "numbers": self.numbers,
        }


def _termset(kind: str, extra: ContextTerms, base_name: str | None) -> dict[str, list[str]]:
    """negspacy's termset (named in the rule file) extended by ours, for negation; ours alone otherwise."""
    from negspacy.termsets import termset

    base = termset(base_name).get_patterns() if base_name else {}
    out: dict[str, list[str]] = {}
    for key, ours in (
        ("pseudo_negations", extra.pseudo),
        ("preceding_negations", extra.preceding),
        ("following_negations", extra.following),
        ("termination", extra.termination),
    ):
        ours = [fold(t) for t in ours]
        if key == "pseudo_negations":
            # negspacy's triggers "don't", "isn't", "can't"... start at the auxiliary: a pseudo-negation
            # written "n't see" must start there too to cancel them
            ours += [f"{aux}{t}" for t in ours if t.startswith("n't ") for aux in _AUXILIARIES]
        merged = list(base.get(key, [])) + [t for t in ours if t not in base.get(key, [])]
        if kind == "negated" and key == "preceding_negations":
            # inability is a symptom here ("can't breathe"), never an absence
            merged = [t for t in merged if t not in ("cannot", "can't", "cant", "not demonstrate")]
        out[key] = merged
    return out


def compose(prefix: str, body: str) -> str:
    """The answer a client sees: fixed advice first, then whatever the model (or the gate) said."""
    return f"{prefix}\n\n{body}" if prefix else body
