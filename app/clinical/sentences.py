"""The words grounding reads a sentence by: sentence splitting (abbreviations and decimals kept
together), content words (stop words out, a light stem), words too general to support a sentence,
and the named things a sentence can get wrong (conditions, drugs, tests). Pure Python."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Protocol

STOP = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "also",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "may",
        "me",
        "might",
        "more",
        "most",
        "must",
        "my",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "patient",
        "patients",
        "likely",
        "diagnosis",
        "answer",
        "question",
        "next",
        "step",
        "management",
        "case",
        "likely",
        "possible",
        "usually",
        "often",
        "common",
        "include",
        "including",
        "such",
        "e",
        "g",
        "ie",
        "eg",
        "etc",
        "one",
        "two",
        "three",
    ]
)
# words too general to support a sentence on their own ("the symptoms suggest a chronic disease"): they do
# not count towards support, so a sentence must share specific words with a passage
GENERIC = frozenset(
    [
        "suggest",
        "symptom",
        "sign",
        "disease",
        "condition",
        "common",
        "cause",
        "chronic",
        "acute",
        "include",
        "often",
        "usually",
        "type",
        "may",
        "also",
        "help",
        "need",
        "well",
        "case",
        "history",
        "present",
        "report",
        "assessment",
        "possible",
        "potential",
        "consider",
        "further",
        "evaluation",
        "manage",
        "treatment",
        "care",
        "medical",
        "health",
        "doctor",
        "could",
        "might",
        "important",
        "various",
        "several",
        "different",
        "related",
        "associated",
        "lead",
        "result",
        "effect",
        "affect",
        "person",
        "people",
        "body",
    ]
)
WORD = re.compile(r"[a-z][a-z0-9\-]+|\d+(?:\.\d+)?")
# drug and disease name endings (INN stems; pathology suffixes)
_NAMED_SUFFIX = re.compile(
    r"^[a-z]{3,}(?:mab|nib|pril|sartan|olol|statin|cillin|mycin|micin|azole|prazole|dipine|floxacin|cycline|vir"
    r"|oxacin|tidine|parin|xaban|gatran|semide|thiazide|triptan|zepam|zolam|oxetine|pramine|itis|osis|emia|aemia"
    r"|oma|pathy|algia|plasia|ectomy|otomy|scopy|graphy|gram|penia|uria|rrhea|rrhoea|plegia|trophy|cele)$"
)
_TESTS = frozenset(
    [
        "ecg",
        "ekg",
        "mri",
        "ct",
        "x-ray",
        "xray",
        "ultrasound",
        "echocardiogram",
        "echocardiography",
        "biopsy",
        "angiography",
        "angiogram",
        "troponin",
        "d-dimer",
        "colonoscopy",
        "endoscopy",
        "spirometry",
        "culture",
        "cultures",
        "lumbar",
        "puncture",
        "eeg",
        "emg",
        "pet",
        "scan",
        "cbc",
        "urinalysis",
        "mammogram",
        "mammography",
        "pap",
        "smear",
        "hba1c",
        "tsh",
        "inr",
    ]
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[])|\n{2,}|\n(?=\s*[-*•\d])")
_ABBREV = re.compile(r"(?:\b(?:e\.g|i\.e|vs|dr|mr|mrs|ms|st|etc|approx|fig|no)\.)$", re.IGNORECASE)


class PassageLike(Protocol):
    title: str
    text: str
    focus: tuple[str, ...]


def stem(word: str) -> str:
    """A light suffix stem (plural, -ing, -ed, -ly), enough to match "fractures" with "fractured"."""
    for suffix in ("ations", "ation", "ings", "ing", "edly", "ies", "ied", "ed", "es", "ly", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
    return word


def content_terms(text: str) -> set[str]:
    return {stem(w) for w in WORD.findall(text.lower()) if w not in STOP and len(w) > 2}


def split_sentences(text: str) -> list[str]:
    """Sentences, keeping abbreviations ("e.g.", "Dr.") and decimals together."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start : m.start()]
        if _ABBREV.search(piece.rstrip()):
            continue
        if piece.strip():
            out.append(piece.strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def named_things(text: str, lexicon: Collection[str] = ()) -> set[str]:
    """Conditions, drugs and tests a sentence names: pack condition names (1-4 word n-grams),
    drug/disease suffixes, and a list of tests."""
    words = WORD.findall(text.lower())
    found = {w for w in words if w in _TESTS or _NAMED_SUFFIX.match(w)}
    if lexicon:
        for n in (4, 3, 2, 1):
            for i in range(len(words) - n + 1):
                gram = " ".join(words[i : i + n])
                if gram in lexicon and gram not in STOP:
                    found.add(gram)
    return found
