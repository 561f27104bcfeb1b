"""Triage's anchored matchers against one spaCy Matcher of every pattern: the same matches on every text
we have, and the time a question's triage takes either way.

    python benchmarks/triage_matchers.py

Texts: the triage evaluation sets (tests/data), the classifier's examples, MedText questions and
answers, MedQuAD questions, LiveQA messages. For each text, each language's pipeline and both of its
matchers (concepts, scope): ``Matchers`` (app/clinical/triage/matchers.py) must return exactly what a
single Matcher holding all the token patterns, plus the PhraseMatcher, returns. Then triage is timed
on the same questions with the anchored matchers and with the single Matcher swapped in, interleaved.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SOURCES = [
    (ROOT / "tests" / "data" / "triage_cases.jsonl", "text"),
    (ROOT / "tests" / "data" / "triage" / "holdout.jsonl", "text"),
    (ROOT / "app" / "clinical" / "triage" / "tune.jsonl", "text"),
    (ROOT / "app" / "clinical" / "triage" / "examples_extra.jsonl", "text"),
    (SHARED / "medtext" / "medtext.jsonl", "prompt"),
    (SHARED / "medtext" / "medtext.jsonl", "completion"),
    (SHARED / "medquad" / "medquad.jsonl", "question"),
    (ROOT / "benchmarks" / "data" / "liveqa_2017_medical_test.jsonl", "message"),
    (ROOT / "benchmarks" / "data" / "liveqa_2017_medical_train.jsonl", "message"),
]


class Whole:
    """One spaCy Matcher holding every token pattern of a ``Matchers``, with its PhraseMatcher."""

    def __init__(self, matchers: object, vocab: object) -> None:
        from spacy.matcher import Matcher

        self.vocab, self.phrases = vocab, matchers.phrases  # type: ignore[attr-defined]
        self.tokens = Matcher(vocab)
        for label, patterns in matchers.token_patterns().items():  # type: ignore[attr-defined]
            self.tokens.add(label, patterns)

    def __call__(self, doc: object) -> list[tuple[str, int, int]]:
        strings = self.vocab.strings  # type: ignore[attr-defined]
        found = {(strings[m], s, e) for m, s, e in [*self.tokens(doc), *self.phrases(doc)]}  # type: ignore[operator]
        return sorted(found, key=lambda m: (m[1], m[2], m[0]))


def main() -> None:
    from app.clinical.safety import SafetyLayer
    from app.clinical.triage.text import canonical, expand, fold

    texts = [
        t
        for path, key in SOURCES
        if path.is_file()
        for line in path.open()
        if line.strip() and (t := json.loads(line).get(key))
    ]
    anchored, whole = SafetyLayer.load(), SafetyLayer.load()
    for pipe in whole.pipelines.values():
        pipe.matcher = Whole(pipe.matcher, pipe.nlp.vocab)  # type: ignore[assignment]
        pipe.scope = Whole(pipe.scope, pipe.nlp.vocab)  # type: ignore[assignment]
    differences = 0
    for text in texts:
        folded = fold(canonical(text))
        for code, pipe in anchored.pipelines.items():
            doc = pipe.nlp.make_doc(pipe.speller.correct(expand(folded, pipe.forms)))
            other = whole.pipelines[code]
            differences += pipe.matcher(doc) != other.matcher(doc) or pipe.scope(doc) != other.scope(doc)
        differences += anchored.triage(text).public() != whole.triage(text).public()
    questions = texts[:2000:4]
    times: dict[str, list[float]] = {"anchored matchers": [], "one Matcher of every pattern": []}
    for _ in range(3):
        for name, layer in zip(times, (anchored, whole), strict=True):
            t0 = time.perf_counter()
            for q in questions:
                layer.triage(q)
            times[name].append((time.perf_counter() - t0) / len(questions) * 1e3)
    rows = [{"matching": k, "triage_ms_per_question_median": round(statistics.median(v), 2)} for k, v in times.items()]
    report(
        "Triage: anchored matchers vs one Matcher of every pattern",
        rows,
        {
            "texts_compared": len(texts),
            "texts_with_a_difference": differences,
            "pattern_groups": {
                code: {"concepts": len(p.matcher.anchored), "scope": len(p.scope.anchored)}
                for code, p in anchored.pipelines.items()
            },
            "questions_timed": len(questions),
        },
    )


if __name__ == "__main__":
    main()
