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
        # one question at a time: the union's parts and the regression called directly compute the same
        # numbers as the pipeline's predict_proba without its per-call dispatch (a quarter of the time)
        self._parts = [vectorizer for _, vectorizer in features.transformer_list]
        self._regression = self.model.steps[-1][1]

    def probabilities(self, folded: str) -> dict[str, float]:
        from scipy.sparse import hstack

        x = hstack([part.transform([folded]) for part in self._parts]).tocsr()
        probs = self._regression.predict_proba(x)[0]
        return {label: float(p) for label, p in zip(self.classes, probs, strict=True)}
