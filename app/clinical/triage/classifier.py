"""The second signal: a linear classifier over word and character n-grams, independent of the phrases.

Phrase rules miss what their author did not think of; a statistical model over character n-grams
(robust to misspellings and word order) and word n-grams, trained on labelled questions in every
language, fails differently. It is combined fail-safe with the rules: when it flags a level the
rules did not, the response is flagged at that level with a flag that says the classifier alone
raised it. Trained at start from the labelled examples beside the rule file (a few hundred
questions, about a second); deterministic (fixed solver, no randomness).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABELS = ("emergency", "crisis", "other")


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def read_examples(path: Path) -> list[Example]:
    """Labelled questions (JSONL with ``text`` and ``label``); urgent and routine are ``other``."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(Example(row["text"], row["label"] if row["label"] in LABELS else "other"))
    return out


class TriageClassifier:
    """P(emergency), P(crisis) for a folded question."""

    def __init__(self, folded_texts: list[str], labels: list[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion, make_pipeline

        features = FeatureUnion(
            [
                ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=1)),
                ("words", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
            ]
        )
        self.model = make_pipeline(features, LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced"))
        self.model.fit(folded_texts, labels)
        self.classes = [str(c) for c in self.model.classes_]
        regression = self.model.steps[-1][1]
        self._scorer = _Scorer([vectorizer for _, vectorizer in features.transformer_list], regression)
        # the scorer must be the pipeline, number for number: checked on every example, else the pipeline
        expected = self.model.predict_proba(folded_texts)
        self._fast = all(
            np.allclose(self._scorer(text), row, rtol=0, atol=1e-9)
            for text, row in zip(folded_texts, expected, strict=True)
        )

    def probabilities(self, folded: str) -> dict[str, float]:
        probs = self._scorer(folded) if self._fast else self.model.predict_proba([folded])[0]
        return {label: float(p) for label, p in zip(self.classes, probs, strict=True)}


class _Scorer:
    """The fitted pipeline's ``predict_proba`` for one text, in plain Python and numpy: each vectorizer's
    n-grams looked up, counted, weighted (sublinear tf x idf) and scaled to unit length, the regression's
    coefficient columns of the n-grams present summed, a softmax. scikit-learn's per-call input checks,
    sparse matrices and dispatch were most of triage's classifier time (1.8 of 4-6 ms a question) for a
    few dozen non-zero features."""

    def __init__(self, parts: list, regression: object) -> None:
        self.parts = []
        offset = 0
        for v in parts:
            if v.norm != "l2" or not v.use_idf or v.binary:
                raise ValueError("the scorer computes l2-normalised tf-idf only")
            self.parts.append((v.build_analyzer(), v.vocabulary_, v.idf_, v.sublinear_tf, offset))
            offset += len(v.vocabulary_)
        self.coef = np.ascontiguousarray(regression.coef_.T)  # (features, classes): a feature's row
        self.intercept = regression.intercept_
        if self.coef.shape[1] < 3:  # two classes: a logistic, not a softmax (not this file's three labels)
            raise ValueError("the scorer computes a multinomial regression only")

    def __call__(self, folded: str) -> np.ndarray:
        z = self.intercept.copy()
        for analyze, vocabulary, idf, sublinear, offset in self.parts:
            counts: dict[int, int] = {}
            for gram in analyze(folded):
                j = vocabulary.get(gram)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            if not counts:
                continue
            index = np.fromiter(counts, dtype=np.int64, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            weights = (np.log(tf) + 1.0 if sublinear else tf) * idf[index]
            weights /= np.sqrt(weights @ weights)
            z += weights @ self.coef[index + offset]
        z -= z.max()
        e = np.exp(z)
        return e / e.sum()
