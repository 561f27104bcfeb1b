"""The sampler's incremental detokenizing against decoding every id: the shipped tokenizer (no model),
answers in English and Portuguese with accents, emoji and symbols (byte-fallback tokens), split at every
step. What streams must be exactly the final text, piece by piece."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoTokenizer

from app.engine.base import GenerationJob, SamplingParams
from app.engine.sampling import Row, Sampler
from tests.conftest import ROOT

TEXTS = [
    "Chest pain radiating to the left arm needs an ECG now.",
    "Dor no peito há duas horas, suor frio e falta de ar: ligue 192 já. Não espere!",
    "Febre de 39,5 °C no bebê de 2 meses → pronto-socorro 🚑 imediatamente.",
    "Take 500 mg paracetamol (acetaminophen) q6h; max 4 g/day. Don't mix with alcohol…",
]


@pytest.fixture(scope="module")
def shipped_tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(ROOT / "model_artifacts" / "default")


def answers() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "shipped_answers.jsonl").open(encoding="utf-8")]
    return TEXTS + [r["answer"] for r in rows[:40]]


@pytest.mark.parametrize("stop", [(), ("ECG",)])
def test_streamed_pieces_are_the_final_text(shipped_tokenizer, stop: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    tokenizer = shipped_tokenizer
    sampler = Sampler(tokenizer, eos_id=-1)
    for text in answers():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces: list[str] = []
        params = SamplingParams(max_new_tokens=len(ids) + 1, stop=stop)
        row = Row(GenerationJob([1], params, on_text=pieces.append, cancelled=threading.Event()), torch.Generator())
        for token in ids:
            sampler._record(row, token, 0.0)
            assert row.decoded == tokenizer.decode(row.ids, skip_special_tokens=True).rstrip("\ufffd")
            if row.finish:
                break
        result = sampler.result(row)
        assert "".join(pieces) == result.text
        if not stop or "ECG" not in text:
            assert result.text == tokenizer.decode(ids, skip_special_tokens=True)
