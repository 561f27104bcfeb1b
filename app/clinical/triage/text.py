"""Canonical text for triage and scope: one form of a question, whatever the keyboard did.

An outside probe defeated phrase rules with a double space, a no-break space, a soft hyphen, a
zero-width space or full-width letters. Every decision is therefore taken on the canonical form:
Unicode NFKC (full-width and compatibility letters become plain ones), format characters removed
(zero-width spaces and joiners, soft hyphens, BOMs, bidi marks: category Cf), every run of
whitespace one space. Matching then works on a *folded* form: lower case, accents removed
("não" -> "nao", so a phrase written with or without accents matches both), and texting forms
expanded to the words the rules are written in (``cant`` -> ``can't``, ``tá`` -> ``está``),
per language, from the rule file.

Linear in the text; pure Python.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def canonical(text: str) -> str:
    """NFKC, format characters removed, whitespace collapsed, stripped."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return _SPACE.sub(" ", text).strip()


def fold(text: str) -> str:
    """Lower case without accents (NFKD, combining marks removed); curly apostrophes made plain."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def expand(folded: str, forms: Mapping[str, str]) -> str:
    """Texting forms replaced word by word (``u`` -> ``you``); ``forms`` keys are folded words."""
    if not forms:
        return folded
    return _WORD.sub(lambda m: forms.get(m.group(0), m.group(0)), folded)


def is_blank(text: str) -> bool:
    """True when nothing but whitespace and invisible characters is left."""
    return not canonical(text)


class Speller:
    """Bounded correction of misspelt long words towards the rule file's own words.

    One edit from 8 letters, two from 11 ("unconcious" -> "unconscious", "breating" -> "breathing"),
    by symmetric deletion (SymSpell): every word of the rules is indexed by its deletions, so a
    question's word is looked up in a few dictionary probes, not compared with every phrase.
    Shorter words are never changed (too many real words lie one letter apart: fit/sit, fell/feel).
    """

    def __init__(self, words: set[str]) -> None:
        self.words = {w for w in words if w.isalpha()}
        self.index: dict[str, str] = {}
        for word in sorted(self.words):
            if len(word) >= 8:
                for variant in _deletions(word, 2 if len(word) >= 11 else 1):
                    self.index.setdefault(variant, word)

    def correct(self, text: str) -> str:
        return _WORD.sub(lambda m: self._word(m.group(0)), text)

    def _word(self, word: str) -> str:
        if len(word) < 8 or word in self.words or not word.isalpha():
            return word
        for variant in (word, *_deletions(word, 2 if len(word) >= 11 else 1)):
            hit = self.index.get(variant)
            if hit is not None and abs(len(hit) - len(word)) <= (2 if len(hit) >= 11 else 1):
                return hit
        return word


def _deletions(word: str, depth: int) -> set[str]:
    out = {word[:i] + word[i + 1 :] for i in range(len(word))}
    if depth > 1:
        out |= {d for w in list(out) for d in _deletions(w, depth - 1)}
    return out
