"""Phrase matching for triage: spaCy's matchers, with the rule file's token patterns kept apart by anchor.

A question is matched against a few hundred patterns per language on every request, before any model
call: what a pattern needs to see in a text (a word, one of its alternatives, a word's beginning) decides
whether it is tried at all. See ``Matchers``.
"""

from __future__ import annotations

import re
from typing import Any


class Matchers:
    """spaCy's PhraseMatcher for the plain word sequences (most of the rule file: a hash lookup per
    token) and its token Matcher for the phrases that need it (gaps, regular expressions, alternatives,
    prefixes), kept apart by anchor.

    The token Matcher tries each of its patterns at every token and evaluates each regular expression on
    every token: with every such phrase in one Matcher that was half of triage's time. A pattern's *anchor*
    is what one of its required tokens must be: an exact word, one of its alternatives, or a word beginning
    with its prefix (``sangr*``); no text without it can match the pattern. Each anchor has its own Matcher
    of the patterns anchored on it, and a question runs only those its words meet, plus the patterns
    without an anchor (every required token a regular expression). The matches are the same (each pattern
    is matched on its own, no greedy filtering, and a pattern skipped could not have matched): checked on
    every triage, evaluation and MedText/MedQuAD/LiveQA text, 20,908 of them, by benchmarks/triage_matchers.py."""

    def __init__(self, vocab: Any) -> None:
        from spacy.matcher import Matcher, PhraseMatcher

        self.vocab = vocab
        self.phrases = PhraseMatcher(vocab, attr="LOWER")
        self.unanchored = Matcher(vocab)
        self.anchored: dict[tuple[str, str], Any] = {}  # ("word" or "prefix", text) -> its patterns' Matcher

    def add(self, label: str, patterns: list[list[dict[str, Any]]]) -> None:
        from spacy.matcher import Matcher
        from spacy.tokens import Doc

        plain: list[list[dict[str, Any]]] = []
        for p in patterns:  # a plain phrase: every token one exact lower-case word
            if all(set(t) == {"LOWER"} and isinstance(t["LOWER"], str) for t in p):
                plain.append(p)
                continue
            needed = anchors(p)
            if needed is None:
                self.unanchored.add(label, [p])
            for anchor in needed or ():
                if anchor not in self.anchored:
                    self.anchored[anchor] = Matcher(self.vocab)
                self.anchored[anchor].add(label, [p])
        if plain:
            self.phrases.add(label, [Doc(self.vocab, words=[t["LOWER"] for t in p]) for p in plain])

    def token_patterns(self) -> dict[str, list[list[dict[str, Any]]]]:
        """Every token pattern by label, each once, whatever group holds it (to check the grouping against one
        Matcher of them all: tests, benchmarks/triage_matchers.py)."""
        out: dict[str, list[list[dict[str, Any]]]] = {}
        for part in [*self.anchored.values(), self.unanchored]:
            for key, patterns in part._patterns.items():  # spaCy keeps no public list of a Matcher's patterns
                kept = out.setdefault(self.vocab.strings[key], [])
                kept += [p for p in patterns if p not in kept]
        return out

    def __call__(self, doc: Any) -> list[tuple[str, int, int]]:
        """(label, start, end) of every match, each once, in the order of the text."""
        strings = self.vocab.strings
        words = {t.lower_ for t in doc}
        met = {("word", w) for w in words} | {("prefix", w[:k]) for w in words for k in range(1, len(w) + 1)}
        matchers = [self.anchored[a] for a in sorted(met & self.anchored.keys())]
        if len(self.unanchored):
            matchers.append(self.unanchored)
        found = {(strings[m], s, e) for matcher in [*matchers, self.phrases] for m, s, e in matcher(doc)}
        return sorted(found, key=lambda m: (m[1], m[2], m[0]))


# a prefix phrase's token (``sangr*``, see app.clinical.safety): ^ and the escaped prefix, nothing else
_PREFIX_REGEX = re.compile(r"\^((?:\\.|[^\\.^$*+?{}\[\]|()])+)")


def anchors(pattern: list[dict[str, Any]]) -> set[tuple[str, str]] | None:
    """The fewest anchors one of which a text must meet for ``pattern`` to match it: the exact word, the
    alternatives or the prefix of one of its required tokens (None: every required token is a regular
    expression)."""
    best: set[tuple[str, str]] | None = None
    for token in pattern:
        if token.get("OP", "1") not in ("1", "+") or set(token) - {"LOWER", "OP"}:
            continue
        value = token.get("LOWER")
        if isinstance(value, str):
            found = {("word", value)}
        elif isinstance(value, dict) and set(value) == {"IN"}:
            found = {("word", w) for w in value["IN"]}
        elif isinstance(value, dict) and set(value) == {"REGEX"} and (m := _PREFIX_REGEX.fullmatch(value["REGEX"])):
            found = {("prefix", re.sub(r"\\(.)", r"\1", m.group(1)))}
        else:
            continue
        if best is None or len(found) < len(best):
            best = found
    return best
