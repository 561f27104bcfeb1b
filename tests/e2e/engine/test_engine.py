"""The engine's own decode loop: batching must not change what each request gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.base import GenerationJob, SamplingParams
from app.engine.local import Engine


@pytest.fixture(scope="module")
def engine(ci_checkpoint: Path) -> Engine:
    return Engine.load(ci_checkpoint)


QUESTIONS = [
    "A 45-year-old woman has fatigue and weight gain. What next?",
    "Chest pain?",
    "A child has a barking cough and stridor at night. What is the likely diagnosis and treatment?",
]


def test_batched_rows_match_solo_runs(engine: Engine) -> None:
    """Left padding, per-row stop lengths and KV-cache pruning leave each row's greedy output unchanged."""
    jobs = [
        GenerationJob(engine.encode_question(q, "General Practitioner"), SamplingParams(max_new_tokens=n))
        for q, n in zip(QUESTIONS, (3, 7, 12), strict=True)
    ]
    batched = engine.generate(jobs)
    for job, got in zip(jobs, batched, strict=True):
        solo = engine.generate([GenerationJob(job.prompt_ids, job.params)])[0]
        assert got.token_ids == solo.token_ids
        assert got.logprobs == pytest.approx(solo.logprobs, abs=2e-2)
        assert len(got.token_ids) <= job.params.max_new_tokens


def test_logprobs_are_the_model_scores_of_its_answer(engine: Engine) -> None:
    """The perplexity /ask reports equals teacher-forced scoring of the same tokens afterwards."""
    from app.clinical.scoring import score_encoded

    job = GenerationJob(engine.encode_question(QUESTIONS[0], "Endocrinologist"), SamplingParams(max_new_tokens=10))
    res = engine.generate([job])[0]
    assert res.token_ids
    rescored = score_encoded(engine.model, [(job.prompt_ids + res.token_ids, len(job.prompt_ids))], engine.pad_id)[0]
    assert rescored == pytest.approx(res.logprobs, abs=2e-2)


def test_sampling_is_seeded_per_row(engine: Engine) -> None:
    ids = engine.encode_question(QUESTIONS[1], "Cardiologist")
    p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    a = engine.generate([GenerationJob(ids, p), GenerationJob(ids, SamplingParams(max_new_tokens=8))])[0]
    b = engine.generate([GenerationJob(ids, p)])[0]
    assert a.token_ids == b.token_ids


def test_cancelled_rows_stop_early(engine: Engine) -> None:
    ids = engine.encode_question(QUESTIONS[2], "Pediatrician")
    job = GenerationJob(ids, SamplingParams(max_new_tokens=50))
    job.cancelled.set()
    other = GenerationJob(ids, SamplingParams(max_new_tokens=6))
    res = engine.generate([job, other])
    assert res[0].finish_reason == "cancelled" and len(res[0].token_ids) <= 1
    assert len(res[1].token_ids) <= 6


def test_rows_admitted_mid_batch_match_solo_runs(engine: Engine) -> None:
    """Continuous batching: jobs that join a running batch get what they would get alone."""
    first = GenerationJob(engine.encode_question(QUESTIONS[2], "Pediatrician"), SamplingParams(max_new_tokens=24))
    late = [
        GenerationJob(engine.encode_question(QUESTIONS[1], "Cardiologist"), SamplingParams(max_new_tokens=9)),
        GenerationJob(engine.encode_question(QUESTIONS[0], "Endocrinologist"), SamplingParams(max_new_tokens=12)),
    ]
    calls = {"admit": 0}
    finished: dict[int, object] = {}

    def admit(room: int) -> list[GenerationJob]:
        calls["admit"] += 1
        assert room >= 1
        return {2: late[:1], 5: late[1:]}.get(calls["admit"], [])

    results = engine.generate(
        [first], admit=admit, on_finish=lambda job, res: finished.__setitem__(id(job), res), max_rows=4
    )
    assert engine.continuous_batching and calls["admit"] >= 5
    assert results[0] is finished[id(first)] and len(finished) == 3
    for job in [first, *late]:
        solo = engine.generate([GenerationJob(job.prompt_ids, job.params)])[0]
        got = finished[id(job)]
        assert got.token_ids == solo.token_ids
        assert got.logprobs == pytest.approx(solo.logprobs, abs=2e-2)


@pytest.mark.parametrize("temperature", [1e-120, 1e-6, 5e-5])
def test_tiny_temperatures_decode_greedily(engine: Engine, temperature: float) -> None:
    """Found by fuzzing: logits / 1e-120 overflowed to inf and sampling raised (a 500)."""
    ids = engine.encode_question(QUESTIONS[1], "Cardiologist")
    greedy = engine.generate([GenerationJob(ids, SamplingParams(max_new_tokens=6))])[0]
    tiny = engine.generate([GenerationJob(ids, SamplingParams(max_new_tokens=6, temperature=temperature, seed=1))])[0]
    assert tiny.token_ids == greedy.token_ids
