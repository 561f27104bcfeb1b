"""Which language a question is written in: a measured heuristic, no model.

Short, misspelt, accent-free questions ("nao consigo respirar", "cant breathe") defeat n-gram
detectors trained on prose; what identifies them is their function words. Each language in the rule
file lists its common words (``markers``); the language with most marker tokens wins, with accented
letters that English never uses counting for Portuguese. Ties go to the rule file's default.
Accuracy on the labelled sets is reported by ``benchmarks/triage.py``. Triage itself matches every
language's phrases whatever this says (fail-safe); the language chooses the words of the advice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_TOKEN = re.compile(r"[a-z]+")
_PT_LETTERS = re.compile(r"[ãõçâêôà]")


def detect(canonical_lower: str, folded: str, markers: Mapping[str, Sequence[str]], default: str) -> str:
    """The language code whose marker words occur most often in the question."""
    tokens = _TOKEN.findall(folded)
    scores = {code: sum(t in set(words) for t in tokens) for code, words in markers.items()}
    if "pt" in scores:
        scores["pt"] += 2 * len(_PT_LETTERS.findall(canonical_lower))
    best = max(scores.values(), default=0)
    winners = [code for code, s in scores.items() if s == best]
    return default if best == 0 or default in winners else winners[0]
