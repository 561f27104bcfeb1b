"""Perplexity math and prompting, on a real tokenizer from the ci checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from app.clinical.prompting import build_messages, render_prompt, role_problem
from app.clinical.scoring import Score, chosen_logprobs, combine, count_words, encode_for_scoring


def test_units_follow_lm_eval_conventions() -> None:
    s = Score(sum_logprob=-12.0, tokens=6, words=3, bytes=10)
    assert s.perplexity == pytest.approx(math.exp(2.0))
    assert s.word_perplexity == pytest.approx(math.exp(4.0))
    assert s.bits_per_byte == pytest.approx(12.0 / (10 * math.log(2)))


def test_corpus_score_sums_before_dividing() -> None:
    total = combine([Score(-2.0, 1, 1, 2), Score(-10.0, 9, 3, 8)])
    assert total.perplexity == pytest.approx(math.exp(12.0 / 10))
    assert total.tokens == 10 and total.words == 4 and total.bytes == 10


def test_word_count_splits_on_any_whitespace() -> None:
    assert count_words("  a  b\tc\nd ") == 4
    assert count_words("   ") == 0


def test_chosen_logprobs_match_log_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    lp = chosen_logprobs(logits, torch.tensor([0, 2]))
    assert lp[0].item() == pytest.approx(2.0 - math.log(math.exp(2) + 1 + math.exp(-1)))
    assert lp[1].item() == pytest.approx(-math.log(3))


def test_prompt_carries_role_and_splits_cleanly(ci_checkpoint) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ci_checkpoint)
    prompt = render_prompt(tok, "Chest pain for two hours?", "Cardiologist")
    assert "Act as a Cardiologist" in prompt and prompt.endswith("<|assistant|>\n")
    ids, start = encode_for_scoring(tok, prompt, "Likely an acute coronary syndrome.")
    assert ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[start:]) == "Likely an acute coronary syndrome."


def test_roles_are_validated() -> None:
    assert role_problem("Cardiologist") is None
    assert role_problem("x" * 65) is not None
    assert role_problem("Cardio\nlogist") is not None
    assert build_messages("q", "")[0]["content"].startswith("Act as a General Practitioner")
