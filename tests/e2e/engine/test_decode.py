"""The static decode step (app/engine/decode.py): the same answers as the model's own forward, rows that
join and leave the slots keep theirs, and the compiled step is the eager step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine import kernels, kv, native
from app.engine.base import GenerationJob, GenerationResult, SamplingParams
from app.engine.batch import StaticDecodeBatch
from app.engine.kernels import AUTO_KERNELS
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


# log-prob tolerance against the model's forward (whose 4-bit kernel rounds activations to bfloat16)
TOLERANCE = {"float32": 5e-3, "float16": 5e-3, "bfloat16": 1.5e-2, "int8": 5e-2, "int4x8-avx2": 5e-2, "int8-avx2": 5e-2}


@pytest.mark.parametrize(
    ("decode", "prompt", "head"),
    [
        ("int4", "int4", "float32"),
        ("float32", "float32", "bfloat16"),
        ("bfloat16", "int4", "float32"),
        ("float16", "float16", "float16"),
        ("int4-avx2", "float16", "float16-avx2"),
        ("float16-avx2", "int4-avx2", "float32"),
        ("int4x8-avx2", "int8", "int8-avx2"),  # the kernels of 8-bit activations
        ("auto", "auto", "auto"),
    ],
)
def test_every_kernel_gives_the_models_answers(
    ci_checkpoint: Path, reference: Engine, decode: str, prompt: str, head: str
) -> None:
    """The 4-bit kernel and every copy read back through it compute the same model: the reference's
    greedy tokens, log-probs within the kernel's rounding (8-bit activations the loosest);
    auto picks one and says which, with timings."""
    engine = Engine.load(ci_checkpoint)
    engine.use_static_decoder(max_rows=4, decode_weights=decode, prompt_weights=prompt, lm_head=head)
    d = engine.decoder
    assert d is not None
    if decode != "auto":
        assert (d.decode_small, d.decode_large, d.prompt_weights) == (decode, decode, prompt)
    else:
        timing = d.weight_timing
        assert set(AUTO_KERNELS) == set(timing["small"]) == set(timing["large"]) == set(timing["prompt"])
        # one-row kernels near the best on one projection are timed again over a whole step
        small = timing.get("small_step") or timing["small"]
        assert d.decode_small == min(small, key=small.__getitem__)
        assert d.decode_large == min(timing["large"], key=timing["large"].__getitem__)
    info = engine.info()["decode"]
    assert info["decode_weights"] == {"1-4 rows": d.decode_small, "more rows": d.decode_large}
    assert info["cpu_flags"] is not None
    # the 8-bit kernels' instructions, said with the flags that chose them
    vnni = {"avx512_vnni", "avx512vl", "avx512bw"} <= native.reported_flags()
    assert info["integer_dot"] == (None if native.load() else "vnni" if vnni else "avx2")
    got = engine.generate(jobs(engine))
    for g, w in zip(got, reference.generate(jobs(reference)), strict=True):
        assert g.token_ids == w.token_ids
        tol = max(
            TOLERANCE.get(k, 5e-3)
            for k in (d.decode_small, d.decode_large, d.prompt_weights, d.head.kernel, d.head.large)
        )
        assert g.logprobs == pytest.approx(w.logprobs, abs=tol)


def test_a_float16_kv_cache_gives_the_models_answers(ci_checkpoint: Path, reference: Engine) -> None:
    """Keys and values kept in float16 and read by MedAsk's decode attention (prompts: torch's attention
    over them read back): the reference's greedy tokens, log-probs within float16's rounding, half the
    cache's memory."""
    if why := kv.half_unavailable(64):  # the ci model's head size
        pytest.skip(f"no float16 cache here: {why}")
    engine = Engine.load(ci_checkpoint)
    engine.use_static_decoder(max_rows=4, kv_cache="float16")
    d = engine.decoder
    assert d is not None and d.kv_half and d.keys[0].dtype == torch.float16
    info = engine.info()["decode"]
    assert info["kv_cache"]["dtype"] == "float16"
    assert info["kv_cache_mb"] == pytest.approx(kv_cache_mb(ci_checkpoint) / 2, rel=1e-3)
    got = engine.generate(jobs(engine))
    for g, w in zip(got, reference.generate(jobs(reference)), strict=True):
        assert g.token_ids == w.token_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=5e-3)


def kv_cache_mb(checkpoint: Path, rows: int = 4) -> float:
    engine = Engine.load(checkpoint)
    engine.use_static_decoder(max_rows=rows)
    return float(engine.info()["decode"]["kv_cache_mb"])


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


def test_compiled_step_equals_the_eager_step(ci_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled with FBGEMM's kernels (through the medask::packed_linear operator) and, as auto chose
    on an AVX2 CPU, one kernel for steps of 1-4 rows and another for more: every graph is compiled
    before serving (none at the first 5-row step, which stalled every answer), and the compiled step
    computes what the eager step does."""
    from torch._dynamo.utils import counters

    import app.engine.decode as decode_module

    paths = {"small": "int4", "large": "float16", "prompt": "float16"}
    monkeypatch.setattr(decode_module, "choose_paths", lambda *a, **k: (paths, {}))
    engines = []
    for compile in (True, False):
        engine = Engine.load(ci_checkpoint)
        engine.use_static_decoder(max_rows=6, compile=compile, lm_head="float16")
        engines.append(engine)
    compiled, eager = engines
    assert compiled.decoder is not None and compiled.decoder.compiled
    assert compiled.info()["decode"]["compiled"] is True
    assert compiled.info()["decode"]["decode_weights"] == {"1-4 rows": "int4", "more rows": "float16"}
    graphs = counters["stats"]["unique_graphs"]
    queued = jobs(compiled, (5, 9, 7, 8)) + jobs(compiled, (6, 4))
    for batch in (jobs(compiled, (12,)), jobs(compiled, (6, 12, 9)), queued):
        got = compiled.generate(batch)
        want = eager.generate([GenerationJob(j.prompt_ids, j.params) for j in batch])
        for g, w in zip(got, want, strict=True):
            assert g.token_ids == w.token_ids
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while serving


def test_two_compiled_decoders_keep_their_own_graphs(ci_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled step keeps Dynamo's guards on its arguments only (app.engine.compiled): each decoder
    compiles its own copy of the step's code, so a second decoder in the process (a float16 cache here,
    the first's is float32) never runs the first one's graphs. Each gives what its eager step gives.
    Dynamo's graphs run through its eager backend: the guards and the caching are Dynamo's, and inductor's
    code generation would add a minute."""
    import app.engine.compiled as compiled_module

    if why := kv.half_unavailable(64):
        pytest.skip(f"no float16 cache here: {why}")
    monkeypatch.setattr(compiled_module, "BACKEND", "eager")
    engines = []
    for cache in kv.KV_CACHES:
        engine = Engine.load(ci_checkpoint)
        engine.use_static_decoder(max_rows=2, compile=True, kv_cache=cache)
        assert engine.decoder is not None and engine.decoder.compiled
        engines.append(engine)
    for engine in engines * 2:  # each again after the other ran
        got = engine.generate(jobs(engine, (6, 9)))
        assert engine.decoder is not None
        compiled_step = engine.decoder._step
        engine.decoder.use_eager()
        want = engine.generate(jobs(engine, (6, 9)))
        engine.decoder._step, engine.decoder.compiled = compiled_step, True
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


def test_a_forced_kernel_that_cannot_run_is_a_clear_error(ci_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel this torch build lacks is never timed by auto and never silently replaced when forced."""
    from app.engine import kernels

    real = kernels.available
    monkeypatch.setattr(kernels, "available", lambda k: "float16: no FBGEMM here" if k == "float16" else real(k))
    engine = Engine.load(ci_checkpoint)
    with pytest.raises(kernels.KernelError, match="'float16' cannot run here: float16: no FBGEMM"):
        engine.use_static_decoder(max_rows=2, decode_weights="float16")
    with pytest.raises(kernels.KernelError, match="LM head kernel 'float16' cannot run here"):
        engine.use_static_decoder(max_rows=2, lm_head="float16")
    engine.use_static_decoder(max_rows=2, decode_weights="auto", prompt_weights="auto", lm_head="auto")
    d = engine.decoder
    assert d is not None and "float16" not in d.weight_timing["small"] and "float16" not in d.head_timing["small"]
    monkeypatch.setattr(kv, "half_unavailable", lambda dim: "this CPU lacks f16c")
    with pytest.raises(kernels.KernelError, match="KV cache 'float16' cannot run here: this CPU lacks f16c"):
        engine.use_static_decoder(max_rows=2, kv_cache="float16")
    engine.use_static_decoder(max_rows=2, kv_cache="auto", int8_probe=QUESTIONS)
    assert engine.info()["decode"]["kv_cache"] == {
        "dtype": "float32",
        "check": None,
        "timing_ms": {},
        "note": "this CPU lacks f16c",
    }


@pytest.mark.parametrize("cache", kv.KV_CACHES)
def test_chunked_prompts_and_kept_prefixes_keep_the_answers(ci_checkpoint: Path, static: Engine, cache: str) -> None:
    """Prompts run 5 tokens per step between decode steps, and later prompts start from the keys and
    values kept for earlier ones (same role: same system prompt): the answers are the unchunked ones
    (with a float16 cache too: kept prefixes, rows moving between slots)."""
    if cache == "float16" and (why := kv.half_unavailable(64)):
        pytest.skip(f"no float16 cache here: {why}")
    engine = Engine.load(ci_checkpoint)
    engine.use_static_decoder(max_rows=4, prefix_bytes=16 << 20, prefill_chunk=5, kv_cache=cache)
    d = engine.decoder
    assert d is not None
    calls: list[str] = []
    extend, decode = d.extend, d.decode
    d.extend = lambda *a, **k: calls.append("extend") or extend(*a, **k)  # type: ignore[method-assign]
    d.decode = lambda *a, **k: calls.append("decode") or decode(*a, **k)  # type: ignore[method-assign]
    first, queued = jobs(engine, (3, 11)), jobs(engine, (7, 4, 16, 2))
    finished: dict[int, GenerationResult] = {}
    admitted: list[GenerationJob] = []

    def admit(room: int) -> list[GenerationJob]:
        out = queued[:room]
        del queued[:room]
        admitted.extend(out)
        return out

    engine.generate(first, admit=admit, on_finish=lambda job, r: finished.__setitem__(id(job), r), max_rows=4)
    # against the float32 cache: a float16 cache's log-probs within its rounding, as in the test above (1.3e-3
    # seen on an AVX-512 BF16 CPU without AMX, where the bfloat16 prompt kernel rounds differently)
    tol = 1e-3 if cache == "float32" else 5e-3
    for job in first + admitted:
        solo = static.generate([GenerationJob(job.prompt_ids, job.params)])[0]
        assert finished[id(job)].token_ids == solo.token_ids
        assert finished[id(job)].logprobs == pytest.approx(solo.logprobs, abs=tol)
    # a prompt admitted while rows decode advanced between their steps, not all at once
    assert calls.count("extend") > len(first + admitted)  # prompts ran in chunks
    middle = calls[calls.index("decode") :]
    assert ("decode", "extend", "decode") in zip(middle, middle[1:], middle[2:], strict=False)
    prefix = engine.info()["decode"]["prefix_cache"]
    assert prefix["hits"] >= 3 and prefix["reused_tokens"] > 0 and engine.info()["decode"]["prefill_chunk_tokens"] == 5
    # the same prompt again starts from its kept keys and values and gives the same answer
    again = engine.generate([GenerationJob(first[1].prompt_ids, first[1].params)])[0]
    assert again.token_ids == finished[id(first[1])].token_ids


@pytest.mark.parametrize("bound", [50.0, -1.0])
def test_int8_is_an_automatic_choice_only_when_it_passes_the_check_at_start(
    ci_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, bound: float
) -> None:
    """8-bit activations change the arithmetic: auto times int8, int8-avx2 and int4x8-avx2 only when they score the
    probe text within the bound of the 4-bit kernel (issue 28's +0.5%; here a bound they pass and one
    they cannot), and /info says so."""
    import app.engine.decode as decode_module

    monkeypatch.setattr(decode_module, "INT8_MAX_CHANGE_PCT", bound)
    engine = Engine.load(ci_checkpoint)
    probe = [q + " Answer with the next steps." for q in QUESTIONS]
    engine.use_static_decoder(
        max_rows=4, lm_head="auto", decode_weights="auto", prompt_weights="auto", int8_probe=probe, kv_cache="auto"
    )
    d = engine.decoder
    assert d is not None and d.int8_check is not None
    # a float16 KV cache: the same check, then timed against float32 (where MedAsk's attention runs)
    cache = engine.info()["decode"]["kv_cache"]
    if not kv.half_unavailable(d.head_dim):
        assert cache["check"]["admitted"] is (bound > 0) and abs(cache["check"]["change_pct"]) < 50
        if bound > 0:
            assert set(cache["timing_ms"]["small"]) == set(kv.KV_CACHES) == set(cache["timing_ms"]["large"])
            assert cache["dtype"] == kv.fastest(cache["timing_ms"], 4)
        else:
            assert cache["dtype"] == "float32" and cache["timing_ms"] == {}
    check = engine.info()["decode"]["int8_check"]
    assert check["probe_tokens"] >= len(probe) * 10
    assert set(check["kernels"]) == set(kernels.EIGHT_BIT) - {k for k in kernels.EIGHT_BIT if kernels.available(k)}
    for kernel, result in check["kernels"].items():
        assert abs(result["change_pct"]) < 50 and result["admitted"] is (bound > 0)
        assert (kernel in check["admitted"]) is (bound > 0)
        for kind in ("small", "large", "prompt"):
            assert (kernel in d.weight_timing[kind]) is (bound > 0)
    assert check["kernels"]["int8"]["lm_head"] == "int8"
    # a 4-bit kernel is checked with the first 8-bit head admitted before it, the one it may be chosen with
    if "int4x8-avx2" in check["kernels"]:  # (where the native kernels run: AVX2, FMA, F16C)
        assert check["kernels"]["int4x8-avx2"]["lm_head"] == ("int8" if bound > 0 else "float32")
    assert ("int8" in d.head_timing["small"]) is (bound > 0)
    assert "int4x8-avx2" not in d.head_timing["large"]  # a 4-bit kernel: never the LM head


def test_the_one_row_and_prompt_kernels_are_timed_with_the_cache_they_will_serve(
    ci_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Auto's whole-step timing of the one-row kernels and whole-prefill timing of the prompt kernels run with the
    KV cache as served (its dtype, every slot), not the one-slot float32 cache of the start-up checks: there
    torch's attention was half of each step and the choice flipped between starts. Each choice is the least
    time measured, and /info carries the times."""
    import app.engine.decode as decode_module

    seen: list[tuple[str, str, int]] = []
    retime = decode_module.retime

    def spy(decoder: object, projections: object, kind: str) -> str:
        seen.append((kind, decoder.kv_cache, decoder.keys[0].shape[0]))  # type: ignore[attr-defined]
        return retime(decoder, projections, kind)  # type: ignore[arg-type]

    monkeypatch.setattr(decode_module, "retime", spy)
    engine = Engine.load(ci_checkpoint)
    engine.use_static_decoder(
        max_rows=4, decode_weights="auto", prompt_weights="auto", kv_cache="auto", int8_probe=QUESTIONS
    )
    d = engine.decoder
    assert d is not None and seen == [("small", d.kv_cache, 4), ("prompt", d.kv_cache, 4)]
    for kind, chosen in (("small_step", d.decode_small), ("prompt_step", d.prompt_weights)):
        if steps := d.weight_timing.get(kind):  # none when one kernel alone was near the best
            assert chosen == min(steps, key=steps.__getitem__)
            assert engine.info()["decode"]["weight_timing_ms"][kind] == steps
