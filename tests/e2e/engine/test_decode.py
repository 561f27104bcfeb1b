"""The static decode step (app/engine/decode.py): the same answers as the model's own forward, rows that
join and leave the slots keep theirs, and the compiled step is the eager step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine.base import GenerationJob, SamplingParams
from app.engine.batch import StaticDecodeBatch
from app.engine.local import Engine

QUESTIONS = [
    "A 45-year-old woman has fatigue and weight gain. What next?",
    "Chest pain?",
    "A child has a barking cough and stridor at night. What is the likely diagnosis and treatment?",
    "An elderly man fell and now has hip pain and cannot bear weight.",
]


@pytest.fixture(scope="module")
def reference(ci_checkpoint: Path) -> Engine:
    return Engine.load(ci_checkpoint)  # the model's own forward


@pytest.fixture(scope="module")
def static(ci_checkpoint: Path) -> Engine:
    engine = Engine.load(ci_checkpoint)
    engine.use_static_decoder(max_rows=4)
    assert engine.decoder is not None, engine.decode_note
    return engine


def jobs(engine: Engine, lengths: tuple[int, ...] = (5, 9, 14, 20)) -> list[GenerationJob]:
    return [
        GenerationJob(engine.encode_question(q, "General Practitioner"), SamplingParams(n, ignore_eos=True))
        for q, n in zip(QUESTIONS, lengths, strict=False)
    ]


def test_static_step_gives_the_models_answers(reference: Engine, static: Engine) -> None:
    got = static.generate(jobs(static))
    want = reference.generate(jobs(reference))
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        # prompts run through bfloat16 copies of the 4-bit weights, not the 4-bit kernel: a few 1e-3 apart
        assert g.logprobs == pytest.approx(w.logprobs, abs=5e-3)


@pytest.mark.parametrize(
    ("decode", "prompt"), [("int4", "int4"), ("float32", "float32"), ("bfloat16", "int4"), ("auto", "auto")]
)
def test_every_weight_path_gives_the_models_answers(
    ci_checkpoint: Path, reference: Engine, decode: str, prompt: str
) -> None:
    """The 4-bit kernel and dense copies read back through it compute the same model: the reference's
    greedy tokens, log-probs within bfloat16's rounding; auto picks one and says which, with timings."""
    engine = Engine.load(ci_checkpoint)
    # the head's dtype is not what this test is about: timed (auto), it could turn bfloat16 under load and add
    # its own rounding; the forced paths keep a float32 head, auto keeps auto (with the tolerance below)
    head = "auto" if decode == "auto" else "float32"
    engine.use_static_decoder(max_rows=4, decode_weights=decode, prompt_weights=prompt, lm_head=head)
    d = engine.decoder
    assert d is not None
    if decode != "auto":
        assert (d.decode_small, d.decode_large, d.prompt_weights) == (decode, decode, prompt)
    else:
        timing = d.weight_timing
        assert {"int4", "bfloat16", "float32"} == set(timing["small"]) == set(timing["large"]) == set(timing["prompt"])
        assert d.decode_small == min(timing["small"], key=timing["small"].__getitem__)
        assert d.decode_large == min(timing["large"], key=timing["large"].__getitem__)
    info = engine.info()["decode"]
    assert info["decode_weights"] == {"1-4 rows": d.decode_small, "more rows": d.decode_large}
    assert info["cpu_flags"] is not None
    got = engine.generate(jobs(engine))
    for g, w in zip(got, reference.generate(jobs(reference)), strict=True):
        assert g.token_ids == w.token_ids
        # bfloat16 weights or head round to ~3 significant digits: 5e-3, and more with both
        tol = 5e-3 if d.head.kernel == "float32" else 1.5e-2
        assert g.logprobs == pytest.approx(w.logprobs, abs=tol)


def test_a_forced_weight_path_that_does_not_fit_is_a_clear_error(ci_checkpoint: Path) -> None:
    engine = Engine.load(ci_checkpoint)
    with pytest.raises(ValueError, match="dense float32 weights need"):
        engine.use_static_decoder(max_rows=2, decode_weights="float32", dense_bytes=1024)


def test_rows_joining_and_leaving_the_slots_keep_their_answers(static: Engine) -> None:
    """Rows end at different steps (the last slot moves into the hole) while queued rows join."""
    first, queued = jobs(static, (3, 11)), jobs(static, (7, 4, 16, 2))
    finished: dict[int, list[int]] = {}
    admitted: list[GenerationJob] = []  # kept alive: an id() is only unique while its object lives

    def admit(room: int) -> list[GenerationJob]:
        out = queued[:room]
        del queued[:room]
        admitted.extend(out)
        return out

    static.generate(first, admit=admit, on_finish=lambda job, r: finished.__setitem__(id(job), r.token_ids), max_rows=4)
    for job in first + admitted:
        solo = static.generate([GenerationJob(job.prompt_ids, job.params)])[0]
        assert finished[id(job)] == solo.token_ids
    assert len(finished) == 6 and not queued


def test_more_rows_than_slots_use_the_models_forward(static: Engine, reference: Engine) -> None:
    many = jobs(static, (3, 3, 3, 3)) + jobs(static, (3,))
    got = static.generate(many)
    assert [r.token_ids for r in got] == [r.token_ids for r in reference.generate(many)]


def test_compiled_step_equals_the_eager_step(ci_checkpoint: Path, static: Engine, tmp_path: Path) -> None:
    compiled = Engine.load(ci_checkpoint)
    compiled.use_static_decoder(max_rows=4, compile=True)
    assert compiled.decoder is not None and compiled.decoder.compiled
    assert compiled.info()["decode"]["compiled"] is True
    for batch in (jobs(compiled, (12,)), jobs(compiled, (6, 12, 9))):
        got = compiled.generate(batch)
        want = static.generate([GenerationJob(j.prompt_ids, j.params) for j in batch])
        for g, w in zip(got, want, strict=True):
            assert g.token_ids == w.token_ids
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


def test_info_says_which_path_decodes(static: Engine, reference: Engine) -> None:
    assert static.info()["decode"]["path"] == "static" and static.info()["decode"]["kv_cache_mb"] > 0
    assert reference.info()["decode"]["path"] == "model"
    batch = StaticDecodeBatch(static, static.decoder)
    assert len(batch) == 0 and batch.drop_finished() == []


def test_a_too_large_cache_falls_back_to_the_models_forward(ci_checkpoint: Path) -> None:
    engine = Engine.load(ci_checkpoint)
    assert engine.use_static_decoder(max_rows=1_000_000) == 0.0
    assert engine.decoder is None and "lower MEDASK_MAX_BATCH_SIZE" in engine.decode_note
    assert engine.info()["decode"]["path"] == "model"


def test_a_step_that_cannot_compile_runs_eager(ci_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler (the slim Docker image without g++, say): the service still starts, eager."""

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine.load(ci_checkpoint)
    engine.use_static_decoder(max_rows=2, compile=True)
    assert engine.decoder is not None and not engine.decoder.compiled
    assert "torch.compile failed: RuntimeError" in engine.info()["decode"]["note"]
    assert engine.generate(jobs(engine, (4,)))[0].token_ids
