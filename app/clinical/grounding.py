"""Answers a clinician can check: every sentence shown is supported by a cited passage, or withheld.

The model's text is split into sentences; each is compared with the passages the model was given
(the evidence block, numbered like the citations) and with the question:

- **support**: the share of the sentence's content words (lower case, stop words removed, a light
  suffix stem) found in one passage; a sentence is supported by the passages where that share is at
  least ``SUPPORT`` with at least ``MIN_SHARED`` words in common, and gets their ``[n]`` markers;
- **named things**: a condition, drug or test named in the sentence (the pack's condition names,
  drug and disease suffixes, a list of tests) that appears in neither a passage nor the question
  makes the sentence unsupported, whatever its overlap ("erectile dysfunction" for anaphylaxis).

Unsupported sentences are withheld (``strict``, the default), shown with a marker (``mark``), or the
check is skipped (``off``). When too little of the model's text is supported, the answer is composed
from the passages themselves (NLM's CHiQA answers this way): the sentences most relevant to the
question, chosen with maximal marginal relevance (redundancy removed), ordered as a clinician reads
(what it is, what to do now, tests, treatment), each with its ``[n]``, within a length budget.

What the check can see: shared words and named things. What it cannot: negation and direction ("X
does not cause Y" shares every word with "X causes Y"), numbers and doses beyond the words, or
whether a passage is right. It is lexical, and says so (``method``). Pure Python.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.clinical.sentences import GENERIC, WORD, PassageLike, content_terms, named_things, split_sentences

Mode = Literal["strict", "mark", "off"]
METHOD = "lexical: content-word overlap with one passage + named conditions, drugs and tests (cannot see negation)"
SUPPORT = 0.6  # share of a sentence's content words found in one passage
MIN_SHARED = 3  # and at least this many words in common
ENOUGH = 0.5  # below this support rate (or fewer than 2 supported sentences) the evidence composes the answer
BUDGET_SENTENCES = 5
BUDGET_CHARS = 900
MARK = " [not supported by the cited sources]"


@dataclass(frozen=True)
class CheckedSentence:
    text: str
    supported: bool
    cites: tuple[int, ...]  # 1-based passage numbers
    support: float
    missing: tuple[str, ...] = ()  # named things found in neither the passages nor the question

    def public(self) -> dict[str, Any]:
        return {"supported": self.supported, "cites": list(self.cites), "support": round(self.support, 3)}


@dataclass
class Grounding:
    """The delivered answer's text and how it was made."""

    text: str
    answer_source: Literal["model", "evidence", "mixed"]
    mode: str
    checked: list[CheckedSentence] = field(default_factory=list)
    evidence_sentences: int = 0
    method: str = METHOD

    def public(self) -> dict[str, Any]:
        supported = sum(s.supported for s in self.checked)
        n = len(self.checked)
        return {
            "mode": self.mode,
            "sentences": n,
            "supported": supported,
            "withheld": n - supported if self.mode == "strict" else 0,
            "support_rate": round(supported / n, 3) if n else None,
            "evidence_sentences": self.evidence_sentences,
            "method": self.method if self.mode != "off" else "off: not checked",
        }


class Checker:
    """The passages and question one answer is checked against."""

    def __init__(self, passages: Sequence[PassageLike], question: str, lexicon: Collection[str] = ()) -> None:
        self.passages = list(passages)
        self.lexicon = lexicon
        self.question = question.lower()

    # computed at the first sentence, not when a stream opens: a stream's checker is made before the prompt
    # reaches the model, and the passages' terms (1-2 ms) would delay its first token
    @functools.cached_property
    def terms(self) -> list[set[str]]:
        return [content_terms(f"{p.title} {p.text}") for p in self.passages]

    @functools.cached_property
    def source_text(self) -> str:
        return " ".join(f"{p.title} {p.text} {' '.join(p.focus)}" for p in self.passages).lower()

    @functools.cached_property
    def question_terms(self) -> set[str]:
        return content_terms(self.question)  # content_terms lowercases: the question as given

    def check(self, sentence: str) -> CheckedSentence:
        words = content_terms(sentence) - GENERIC
        cites: list[tuple[float, int]] = []
        best = 0.0
        for n, terms in enumerate(self.terms, 1):
            shared = words & terms
            share = len(shared) / len(words) if words else 0.0
            best = max(best, share)
            if share >= SUPPORT and len(shared) >= MIN_SHARED:
                cites.append((share, n))
        missing = tuple(
            sorted(
                t for t in named_things(sentence, self.lexicon) if t not in self.source_text and t not in self.question
            )
        )
        ok = bool(cites) and not missing
        order = tuple(n for _, n in sorted(cites, key=lambda c: (-c[0], c[1]))[:2]) if ok else ()
        return CheckedSentence(sentence, ok, order, best, missing)

    def render(self, checked: CheckedSentence, mode: Mode) -> str | None:
        """The sentence as shown (with its markers), or None when withheld."""
        if mode == "off":
            return checked.text
        if checked.supported:
            return f"{checked.text} {''.join(f'[{n}]' for n in checked.cites)}"
        return f"{checked.text}{MARK}" if mode == "mark" else None

    def compose(self, question: str, exclude: Collection[str] = (), budget: int = BUDGET_SENTENCES) -> list[str]:
        """Sentences from the passages that answer the question, each with its [n], in reading order."""
        candidates: list[tuple[str, int, set[str]]] = []
        leads: set[str] = set()  # a passage's first sentence usually says what the condition is
        for n, p in enumerate(self.passages, 1):
            for i, s in enumerate(_whole_sentences(p.text)):
                terms = content_terms(s)
                if len(terms) >= 3 and s not in exclude:
                    candidates.append((s, n, terms))
                    if i == 0:
                        leads.add(s)
        if not candidates:
            return []
        query = self.question_terms
        chosen: list[tuple[str, int, set[str]]] = []
        used = 0

        def relevance(c: tuple[str, int, set[str]]) -> float:
            # words shared with the question, the passage's retrieval rank (it was judged relevant), a lead
            # sentence, and the conditions, drugs and tests it names (what a clinician reads an answer for)
            named = min(len(named_things(c[0], self.lexicon)), 3)
            return len(c[2] & query) / (len(c[2]) ** 0.5) + 0.5 / c[1] + (0.3 if c[0] in leads else 0.0) + 0.2 * named

        top = max(relevance(c) for c in candidates) or 1.0

        def mmr(c: tuple[str, int, set[str]]) -> float:  # maximal marginal relevance, lambda 0.7
            redundancy = max((len(c[2] & d[2]) / len(c[2] | d[2]) for d in chosen), default=0.0)
            return 0.7 * relevance(c) / top - 0.3 * redundancy

        while candidates and len(chosen) < budget:
            best = max(candidates, key=mmr)
            candidates.remove(best)
            if used + len(best[0]) > BUDGET_CHARS and chosen:
                continue
            chosen.append(best)
            used += len(best[0])
        chosen.sort(key=lambda c: (_reading_order(c[0], self.passages[c[1] - 1].focus), c[1]))
        return [f"{s} [{n}]" for s, n, _ in chosen]


def ground(
    answer: str,
    passages: Sequence[PassageLike],
    question: str,
    mode: Mode = "strict",
    lexicon: Collection[str] = (),
) -> Grounding:
    """The answer a clinician reads: supported sentences with their markers; composed from the passages
    when too little of the model's text is supported. Without passages nothing can be checked: the
    model's text is returned as it is (``answer_source: model``, method says so)."""
    if mode == "off":
        return Grounding(answer.strip(), "model", "off")
    if not passages:
        g = Grounding(answer.strip(), "model", mode)
        g.method = "no evidence in the prompt: nothing to check against (sentences shown unchecked)"
        return g
    checker = Checker(passages, question, lexicon)
    checked = [checker.check(s) for s in _distinct(split_sentences(answer))]
    shown = [t for c in checked if (t := checker.render(c, mode)) is not None]
    supported = [c for c in checked if c.supported]
    rate = len(supported) / len(checked) if checked else 0.0
    g = Grounding(" ".join(shown), "model", mode, checked)
    if len(supported) < 2 or rate < ENOUGH:
        added = checker.compose(question, exclude={c.text for c in supported})
        if added:
            g.evidence_sentences = len(added)
            g.answer_source = "mixed" if supported else "evidence"
            kept = " ".join(checker.render(c, mode) or "" for c in supported).strip() if mode == "strict" else g.text
            lead = "What the sources say:" if not supported else "The sources add:"
            g.text = "\n".join(x for x in (kept, f"{lead} " + " ".join(added)) if x)
    return g


class SentenceGate:
    """Streaming: text is released a sentence at a time, only once the sentence is complete and checked
    (a withheld sentence never reaches the client); ``close`` releases the rest and any composed part."""

    def __init__(self, checker: Checker | None, mode: Mode) -> None:
        self.checker, self.mode = checker, mode
        self.buffer = ""
        self.checked: list[CheckedSentence] = []
        self.sent: list[str] = []
        self.seen: set[str] = set()

    def feed(self, piece: str) -> str:
        if self.checker is None or self.mode == "off":
            self.sent.append(piece)
            return piece
        self.buffer += piece
        parts = split_sentences(self.buffer)
        # the last part is complete only once a paragraph break follows it; until then it waits, as
        # written (its trailing space is what lets the next sentence be seen to start)
        if self.buffer.endswith("\n\n"):
            self.buffer = ""
            return self._release(parts)
        if len(parts) < 2:
            return ""
        self.buffer = self.buffer[self.buffer.rfind(parts[-1]) :]  # the unfinished sentence, spaces kept
        return self._release(parts[:-1])

    def _release(self, sentences: list[str]) -> str:
        assert self.checker is not None
        out = []
        for s in sentences:
            key = _key(s)
            if key in self.seen:  # a loop repeats itself: a sentence is shown once
                continue
            self.seen.add(key)
            c = self.checker.check(s)
            self.checked.append(c)
            shown = self.checker.render(c, self.mode)
            if shown is not None:
                out.append(shown)
        text = " ".join(out)
        if text:
            text = (" " if self.sent else "") + text
            self.sent.append(text)
        return text

    def close(self, question: str) -> tuple[str, Grounding]:
        """The rest of the text, and the grounding of everything released."""
        if self.checker is None or self.mode == "off":
            text = "".join(self.sent).strip()
            g = Grounding(text, "model", "off" if self.mode == "off" else self.mode)
            if self.checker is None and self.mode != "off":
                g.method = "no evidence in the prompt: nothing to check against (sentences shown unchecked)"
            return "", g
        tail = self._release(split_sentences(self.buffer)) if self.buffer.strip() else ""
        self.buffer = ""
        supported = [c for c in self.checked if c.supported]
        rate = len(supported) / len(self.checked) if self.checked else 0.0
        g = Grounding("".join(self.sent).strip(), "model", self.mode, self.checked)
        if len(supported) < 2 or rate < ENOUGH:
            added = self.checker.compose(question, exclude={c.text for c in supported})
            if added:
                lead = "What the sources say:" if not supported else "The sources add:"
                extra = ("\n" if self.sent else "") + f"{lead} " + " ".join(added)
                tail += extra
                self.sent.append(extra)
                g.evidence_sentences = len(added)
                g.answer_source = "mixed" if supported else "evidence"
                g.text = "".join(self.sent).strip()
        return tail, g


_LABEL = re.compile(r"^(?:Assessment|Answer|Diagnosis|Management|Treatment|Plan)\s*:\s*", re.IGNORECASE)
# another patient's story or a question is not a fact about this one: a case vignette ("Case: A 35-year-old
# woman presents with...") and questions are never composed into an answer
_NARRATIVE = re.compile(
    r"^(?:Case\s*:|(?:An?|The)\s+\d+[- ](?:year|month|week|day)[- ]old\b"
    r"|(?:He|She|They|His|Her|The (?:mother|father|parents|infant|child|boy|girl|man|woman))\b"
    r"|On (?:physical )?examination|(?:Physical )?[Ee]xamination (?:reveals|shows))"
    r"|\b(?:presents|presented|complains|reports) (?:with|of)\b",
)


def _key(sentence: str) -> str:
    return " ".join(WORD.findall(sentence.lower()))


def _distinct(sentences: list[str]) -> list[str]:
    """Each sentence once (a loop repeats itself), in order."""
    seen: set[str] = set()
    out = []
    for s in sentences:
        if _key(s) not in seen:
            seen.add(_key(s))
            out.append(s)
    return out


def _whole_sentences(text: str) -> list[str]:
    """A passage's complete statements: a chunk may start or end mid-sentence (those fragments are dropped),
    labels such as "Assessment:" are removed, and case vignettes and questions are left out."""
    parts = split_sentences(text.replace(" - ", ". "))
    if parts and not parts[0][:1].isupper():
        parts = parts[1:]
    if parts and not parts[-1].rstrip().endswith((".", "!", "?")):
        parts = parts[:-1]
    out = []
    for part in parts:
        if part.rstrip().endswith("?") or _NARRATIVE.search(part):
            continue
        part = _LABEL.sub("", part)
        if 30 <= len(part) <= 400:
            out.append(part[0].upper() + part[1:])
    return out


_ORDER = [
    re.compile(r"\b(call|emergency|immediately|urgent|seek|go to)\b", re.I),
    re.compile(r"\b(test|diagnos|exam|scan|x-ray|ecg|ekg|mri|ct|ultrasound|biopsy|blood)\w*", re.I),
    re.compile(r"\b(treat|therap|medicat|drug|surgery|antibiotic|dose|manage)\w*", re.I),
]


def _reading_order(sentence: str, focus: Sequence[str] = ()) -> int:
    """0: what the condition is; 1: what to do now; 2: tests; 3: treatment; 4: the rest."""
    low = sentence.lower()
    if any(low.startswith(f.lower()) or f"{f.lower()} is " in low or f"{f.lower()} are " in low for f in focus):
        return 0
    return 1 + next((i for i, rx in enumerate(_ORDER) if rx.search(sentence)), len(_ORDER))
