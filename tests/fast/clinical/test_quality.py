"""The answer quality gate on its own (fast): real loops written by a shipped model (the
16.9M default shipped until 2026-11-30, kept in tests/data/shipped_answers.jsonl, made by
benchmarks/answer_quality.py) and the MedText gold answers, which must all pass."""

from __future__ import annotations

import json

import pytest

from app.clinical.quality import assess, longest_loop, percentile, repetition, withheld, words
from tests.conftest import TEST_DATA
from training.data import load_medtext

SHIPPED = [json.loads(line) for line in (TEST_DATA / "shipped_answers.jsonl").open()]


def test_real_loops_of_the_shipped_model_are_degenerate() -> None:
    loops = [r for r in SHIPPED if "a diagnosis of a diagnosis of a diagnosis" in r["answer"]]
    assert len(loops) >= 3
    for r in loops:
        q = assess(r["answer"], r["question"], r["perplexity"])
        assert q.degenerate, r["answer"]
        assert set(q.reasons) & {"repetitive", "loop"}


def test_no_gold_answer_is_called_degenerate() -> None:
    rows = load_medtext()
    flagged = [r.id for r in rows if assess(r.completion, r.prompt).degenerate]
    assert flagged == []


def test_the_shipped_model_has_both_kinds_of_answer() -> None:
    verdicts = [assess(r["answer"], r["question"]).degenerate for r in SHIPPED]
    assert any(verdicts) and not all(verdicts)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "empty"),
        ("Yes.", "too short"),
        ("the next step the next step the next step the next step", "repetitive"),
        (
            "Stroke is likely. Give aspirin and call the stroke team; blood blood blood blood blood tests follow.",
            "loop",
        ),
        ("A 58-year-old man has crushing chest pain radiating to the left arm for 40 minutes", "repeats the question"),
    ],
)
def test_each_kind_of_degenerate_answer(answer: str, reason: str) -> None:
    question = "A 58-year-old man has crushing chest pain radiating to the left arm for 40 minutes. Next step?"
    q = assess(answer, question)
    assert q.degenerate and reason in q.reasons
    assert reason in withheld(q) and "No reliable answer" in withheld(q)


def test_measures() -> None:
    assert repetition(words("a b c a b c a b c")) == pytest.approx(1 - 3 / 7)
    assert longest_loop(words("x a diagnosis of a diagnosis of a diagnosis of y")) == 3
    assert longest_loop(words("one two three")) == 1
    ref = [1.0, 2.0, 3.0, 4.0]
    assert percentile(2.5, ref) == 50.0 and percentile(0.5, ref) == 0.0 and percentile(9, ref) == 100.0
    assert percentile(3.0, None) is None
