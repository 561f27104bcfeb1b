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


def test_a_batch_samples_each_row_as_on_its_own(shipped_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Greedy rows without penalties take one argmax over the batch: every row's token is what sampling that
    row alone gives, ties to the first maximum, NaN to the first NaN, beside penalised and sampled rows."""
    from app.engine.sampling import penalised, sample

    settings = [
        SamplingParams(max_new_tokens=8),
        SamplingParams(max_new_tokens=8, frequency_penalty=2.0),
        SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3),
        SamplingParams(max_new_tokens=8),
        SamplingParams(max_new_tokens=8, presence_penalty=1.0),
        SamplingParams(max_new_tokens=8),
    ]
    vocab = len(shipped_tokenizer)
    for mixed in (settings, [settings[0], settings[3]]):  # some rows greedy, and every row greedy
        logits = torch.randn(len(mixed), vocab, generator=torch.Generator().manual_seed(len(mixed)))
        logits[0, 7] = logits[0, 11] = logits[0].max() + 1  # a tie: the first index wins
        logits[-1, 50] = logits[-1, 20] = float("nan")  # broken logits: the first NaN, as torch.argmax
        # earlier ids, so the penalties apply; each row's own generator, seeded alike in both
        rows, alone = (
            [Row(GenerationJob([1], p), torch.Generator().manual_seed(p.seed or 0), ids=[5, 5, 9]) for p in mixed]
            for _ in "ab"
        )
        want = [sample(penalised(logits[r], row), row.job.params, row.gen) for r, row in enumerate(alone)]
        assert Sampler(shipped_tokenizer, eos_id=-1).step(rows, logits) == want
        assert want[0] == 7 and want[-1] == 20
