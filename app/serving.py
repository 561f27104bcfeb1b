"""The handler object the routes call: owns the engine and scheduler, turns
requests into engine jobs, and maps every failure to a clear HTTP error.

Routes stay thin (validate, call one method here, shape the response); no
model logic lives in them, and nothing here imports FastAPI routing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.api.security import text_digest
from app.clinical.evidence import (
    DEFAULT_K,
    DEFAULT_MAX_TOKENS,
    PASSAGES,
    EvidenceError,
    EvidencePack,
    Passage,
    gather,
    load_pack,
)
from app.clinical.grounding import Checker, Grounding, SentenceGate, ground
from app.clinical.prompting import Turn, fit_history
from app.clinical.quality import Quality, assess, withheld
from app.clinical.safety import SafetyLayer, SafetyRulesError, Triage, compose
from app.engine.local import (
    CheckpointError,
    Engine,
    EngineBase,
    EngineError,
    GenerationJob,
    GenerationResult,
    SamplingParams,
    ScoreItem,
)
from app.engine.policy import DeadlineExceeded, QueueFull
from app.engine.scheduler import Scheduler
from app.errors import ApiError, error_body
from app.metrics import Metrics
from app.settings import Settings

DEFAULT_EVIDENCE_DIR = "model_artifacts/evidence"
# tokens the evidence frame adds around the block ("\n\nQuestion: "), kept out of the block's budget
EVIDENCE_FRAME_TOKENS = 16

log = logging.getLogger("medask.serving")


class Serving:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: EngineBase | None = None
        self.safety: SafetyLayer | None = None
        self.evidence: EvidencePack | None = None
        self.evidence_note = "no evidence pack configured"
        # shutdown: draining admits no new work; once the drain period is over, what is left is cut short
        self.draining = False
        self.drain_expired = False
        self.inflight = 0  # HTTP requests being served (the gateway counts them), probes excluded
        self.scheduler: Scheduler | None = None
        self.ready = False
        self.load_error: str | None = None
        self.state = "starting"

    # ---- lifecycle ----------------------------------------------------------
    def load(self) -> None:
        """Load the checkpoint once, warm up, start the worker; then ready. The only writer of
        readiness: whatever fails on the way is recorded here for /ready to say."""
        self.state = "loading"
        try:
            self._load()
        except Exception as exc:
            self.load_error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            raise

    def _load(self) -> None:
        s = self.settings
        try:
            # the rules first: a broken rule file is refused before minutes of model loading
            self.safety = SafetyLayer.load(
                s.safety_rules,
                s.emergency_number,
                s.crisis_line,
                numbers={"pt": {"emergency_number": s.emergency_number_pt, "crisis_line": s.crisis_line_pt}},
            )
        except SafetyRulesError as exc:
            raise CheckpointError(str(exc)) from exc
        try:
            self.evidence = self._load_evidence()
        except EvidenceError as exc:
            raise CheckpointError(str(exc)) from exc
        engine = self._load_engine()
        self._check_pack_against(engine.manifest)
        self.engine = engine
        self.metrics.model_load_seconds.set(engine.load_seconds)
        self.metrics.model_info.labels(
            self.model_name, str(engine.quantization.get("quant_method") or "none"), engine.kernel, engine.device
        ).set(1)
        self.scheduler = Scheduler(
            engine,
            self.metrics,
            batching=s.batching,
            max_batch_size=s.max_batch_size,
            batch_wait_ms=s.batch_wait_ms,
            queue_size=s.queue_size,
            key_share=s.key_queue_share,
            max_batch_tokens=s.max_batch_tokens or s.max_batch_size * engine.context_length // 2,
        )
        if isinstance(engine, Engine):  # before the worker starts: the model is never used by two threads
            self._prepare(engine)
        self.scheduler.start()
        self.ready = True
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info(
            "model ready",
            extra={
                "event": "ready",
                "model": self.model_name,
                "device": engine.device,
                "kernel": engine.kernel,
                "load_seconds": round(engine.load_seconds, 2),
            },
        )

    def _prepare(self, engine: Engine) -> None:
        """A local engine's decode path (the static step, compiled if asked), then a warm-up generation."""
        s = self.settings
        if s.decode == "static":
            self.state = "compiling" if s.compile else "preparing_decode"
            if s.compile and s.compile_cache_dir is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(s.compile_cache_dir)
            try:
                seconds = engine.use_static_decoder(
                    s.max_batch_size if s.batching else 1,
                    compile=s.compile,
                    lm_head=s.lm_head_dtype,
                    decode_weights=s.decode_weights,
                    prompt_weights=s.prompt_weights,
                    dense_bytes=s.dense_weights_mb << 20,
                )
            except ValueError as exc:  # a forced weight path that cannot run here: a clear start-up error
                raise CheckpointError(f"MEDASK_DECODE_WEIGHTS / MEDASK_PROMPT_WEIGHTS: {exc}") from exc
            log.info(engine.decode_note, extra={"event": "decode_path", "seconds": round(seconds, 1)})
        if s.warmup:
            self.state = "warming_up"
            prompt = engine.encode_question(
                "Warm-up: a patient has a mild headache. What next?", "General Practitioner"
            )
            result = engine.generate([GenerationJob(prompt, SamplingParams(max_new_tokens=4))])[0]
            if result.finish_reason not in ("stop", "length"):
                raise CheckpointError("warm-up generation failed")

    def _load_engine(self) -> EngineBase:
        s = self.settings
        if s.engine == "upstream":
            from app.engine.upstream import UpstreamEngine  # httpx client and its loop only when asked for

            assert s.upstream_url is not None  # the settings refuse upstream without a URL
            return UpstreamEngine.load(
                s.model_dir,
                self.metrics,
                url=s.upstream_url,
                api_key=s.upstream_api_key,
                model=s.upstream_model,
                timeout_s=s.upstream_timeout_s,
                probe_s=s.upstream_probe_s,
                retries=s.upstream_retries,
                trust_env=s.upstream_trust_env,
            )
        return Engine.load(s.model_dir, device=s.device, dtype=s.dtype, threads=s.threads)

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.engine is not None:
            self.engine.close()

    def unavailable(self) -> str | None:
        """Why a loaded service cannot answer now (its upstream engine is down), or None."""
        return self.engine.unavailable() if self.engine is not None else None

    def perplexity_note(self, result: GenerationResult) -> str | None:
        """Why an answer has no perplexity (None when it has one)."""
        if result.perplexity is not None:
            return None
        problem = (self.engine and self.engine.score_problem) or "the engine returned no log-probabilities"
        return f"no perplexity: the upstream engine cannot score this answer ({problem})"

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        if self.engine is not None and self.engine.manifest.get("name"):
            return str(self.engine.manifest["name"])
        return self.settings.model_dir.name

    def begin_drain(self) -> None:
        """SIGTERM: /ready turns 503 and new work is refused at once; in-flight work goes on."""
        self.draining = True
        self.ready = False
        self.state = "draining"
        self.metrics.ready.set(0)
        log.info("draining", extra={"event": "draining", "inflight": self.inflight, "drain_s": self.settings.drain_s})

    def end_drain(self) -> None:
        """The drain period is over: whatever is still waiting is answered with 503 / an error event."""
        self.drain_expired = True
        log.info("drain period over", extra={"event": "drain_expired", "inflight": self.inflight})

    def _shutting_down(self) -> ApiError:
        return ApiError(
            503,
            "shutting_down",
            "the server is shutting down; retry (another replica will answer)",
            headers={"Retry-After": "1"},
        )

    def require_ready(self) -> tuple[EngineBase, Scheduler]:
        if self.draining:
            raise self._shutting_down()
        if not self.ready or self.engine is None or self.scheduler is None:
            reason = self.load_error or f"model is {self.state.replace('_', ' ')}"
            raise ApiError(503, "service_unavailable", f"not ready: {reason}", headers={"Retry-After": "5"})
        down = self.engine.unavailable()
        if down is not None:
            raise ApiError(503, "upstream_unavailable", f"not ready: {down}", headers={"Retry-After": "2"})
        return self.engine, self.scheduler

    # ---- evidence -------------------------------------------------------------
    def _load_evidence(self) -> EvidencePack | None:
        """The configured pack (refused when it fails verification), the default one when it
        has been built, or none: then answers carry no citations and /info says why."""
        folder = self.settings.evidence_dir
        if not self.settings.evidence:
            self.evidence_note = "evidence retrieval is turned off (MEDASK_EVIDENCE=false)"
            return None
        if folder is not None:
            if not Path(folder).is_dir():
                raise EvidenceError(f"MEDASK_EVIDENCE_DIR={folder} does not exist")
            self.evidence_note = f"evidence pack {folder}"
            return load_pack(folder, self.settings.evidence_sha256)
        default = Path(DEFAULT_EVIDENCE_DIR)
        if not (default / PASSAGES).is_file():
            self.evidence_note = (
                f"no evidence pack: {default} has not been built (run `python -m training evidence --default`, "
                "which `make serve` does) and MEDASK_EVIDENCE_DIR is not set"
            )
            log.warning(self.evidence_note, extra={"event": "no_evidence"})
            return None
        self.evidence_note = f"evidence pack {default}"
        return load_pack(default, self.settings.evidence_sha256)

    def _check_pack_against(self, manifest: dict[str, Any]) -> None:
        """A checkpoint names the pack it was trained and evaluated with (name and digest): a pack that
        carries that name must be that pack. (A pack with another name, a hospital's own, is the
        operator's choice; MEDASK_EVIDENCE_SHA256 pins any pack.)"""
        named = ((manifest.get("evidence") or {}).get("pack")) or {}
        pack = self.evidence
        if pack is None or self.settings.evidence_sha256 or not named.get("pack_sha256"):
            return
        if named.get("name") == pack.manifest.get("name") and named["pack_sha256"] != pack.pack_sha256:
            raise CheckpointError(
                f"evidence pack {pack.folder} calls itself {named['name']!r}, the pack this checkpoint names, but "
                f"its digest is {pack.pack_sha256}, not the checkpoint's {named['pack_sha256']}: its files were changed"
            )

    def evidence_contract(self) -> tuple[int, int]:
        """(k, max_tokens): the settings, else what the checkpoint was trained with, else the defaults."""
        trained = {}
        if self.engine is not None:
            trained = (self.engine.manifest.get("recipe") or {}).get("evidence") or {}
        k = self.settings.evidence_k or trained.get("k") or DEFAULT_K
        max_tokens = self.settings.evidence_max_tokens or trained.get("max_tokens") or DEFAULT_MAX_TOKENS
        return int(k), int(max_tokens)

    def prompt(
        self,
        question: str,
        role: str,
        max_new: int,
        param: str,
        evidence: bool | None = None,
        k: int | None = None,
        history: Sequence[Turn] = (),
    ) -> tuple[list[int], list[Passage]]:
        """The prompt's token ids and the passages in it. Evidence is retrieved when asked for, or by
        default when a pack is loaded. What must fit is the role and the question; the evidence block
        gets the context that is left (it is what gets cut, never the question), and the earlier
        turns of a conversation what is left after it, oldest dropped first."""
        engine, _ = self.require_ready()
        prompt = engine.encode_question(question, role)
        self.check_context(len(prompt), max_new, param)
        block, passages = "", []
        if evidence or (evidence is None and self.evidence is not None):
            self.require_evidence("evidence")
            room = engine.context_length - len(prompt) - max_new - EVIDENCE_FRAME_TOKENS
            passages, block = self.retrieve(role, question, k, room)
            if not block:
                passages = []
        if not history:
            return (engine.encode_question(question, role, block) if block else prompt), passages
        limit = engine.context_length - max_new
        encoded: dict[int, list[int]] = {}

        def fits(turns: Sequence[Turn]) -> bool:
            encoded[len(turns)] = engine.encode_question(question, role, block, turns)
            return len(encoded[len(turns)]) <= limit

        kept = fit_history(history, fits)
        ids = encoded.get(len(kept)) or engine.encode_question(question, role, block, kept)
        if len(kept) < len(history):
            self.metrics.history_truncations.inc()
        return ids, passages

    def check_model(self, name: str | None) -> None:
        """An OpenAI ``model`` must name the served model (or one of its aliases): a client that asks
        for another model must not silently get this one."""
        if name is None or name == self.model_name or name in self.settings.alias_list:
            return
        raise ApiError(
            404,
            "model_not_found",
            f"the model {name!r} does not exist here; this server serves {self.model_name!r} (GET /v1/models)",
            "model",
            code="model_not_found",
        )

    def require_evidence(self, param: str) -> EvidencePack:
        """The loaded pack, or a 400 saying why there is none (a request asked for evidence)."""
        if self.evidence is None:
            raise ApiError(400, "evidence_unavailable", f"evidence was asked for but {self.evidence_note}", param)
        return self.evidence

    def retrieve(self, role: str, question: str, k: int | None, room: int) -> tuple[list[Passage], str]:
        """Passages and the evidence block for a prompt, within ``room`` tokens of context."""
        engine, _ = self.require_ready()
        default_k, max_tokens = self.evidence_contract()
        t0 = time.perf_counter()
        passages, block = gather(
            self.evidence, role, question, engine.count_tokens, k or default_k, min(max_tokens, room)
        )
        self.metrics.evidence_seconds.observe(time.perf_counter() - t0)
        self.metrics.evidence_requests.labels("hit" if passages else "empty").inc()
        self.metrics.evidence_passages.inc(len(passages))
        return passages, block

    # ---- safety ---------------------------------------------------------------
    def triage(self, text: str) -> Triage:
        """Red-flag triage before any model call; counts flags by rule id, never text."""
        if self.safety is None:
            self.require_ready()
        assert self.safety is not None
        t0 = time.perf_counter()
        result = self.safety.triage(text)
        self.metrics.triage_seconds.observe(time.perf_counter() - t0)
        self.metrics.triage.labels(result.level).inc()
        for flag in result.flags:
            self.metrics.triage_flags.labels(flag.id, flag.level).inc()
        if not result.in_scope:
            self.metrics.scope_refusals.inc()
        return result

    async def triage_conversation(self, history: Sequence[Turn], question: str) -> Triage:
        """Every user turn is triaged: an emergency said earlier in a conversation is still one. The
        conversation is bounded first (before any work), and triage runs off the event loop, so one long
        conversation never stalls other requests or the probes."""
        text = "\n".join([t for speaker, t in history if speaker == "user"] + [question])
        limit = self.settings.max_conversation_chars
        if len(text) > limit:
            raise ApiError(
                413,
                "conversation_too_long",
                f"the conversation's user text is {len(text)} characters, more than {limit} "
                "(MEDASK_MAX_CONVERSATION_CHARS): start a new conversation or shorten it",
                "messages" if history else "question",
            )
        return await asyncio.to_thread(self.triage, text)

    def quality(self, answer: str, question: str, perplexity: float | None) -> Quality:
        """The quality gate, with the answer's perplexity placed among the model's held-out answers."""
        reference = None
        if self.engine is not None:
            reference = (self.engine.manifest.get("heldout_generation") or {}).get("perplexities")
        quality = assess(answer, question, perplexity, reference)
        for reason in quality.reasons:
            self.metrics.degenerate.labels(reason).inc()
        return quality

    def answer(
        self,
        result: GenerationResult,
        question: str,
        triage: Triage,
        passages: list[Passage],
        mode: str | None = None,
    ) -> tuple[str, Quality, Grounding]:
        """What every generating route delivers: the fixed advice first, then the model's sentences that
        a cited passage supports (with their [n]), composed from the passages when too few are; when the
        quality gate withholds the model's text, a plain statement of that, then what the sources say."""
        quality = self.quality(result.text, question, result.perplexity)
        if quality.degenerate and (self.grounding_mode(mode) == "off" or not passages):
            # nothing to check the text against: the gate's verdict stands, with the evidence to read
            g = Grounding(self.shown_answer(result.text, quality, passages), "model", self.grounding_mode(mode))
            g.method = "withheld by the quality gate (no evidence to check against, or grounding off)"
            return compose(triage.prefix, g.text), quality, g
        # a stream shows what its sentence gate released, so the plain answer is the same text: the
        # model's sentences a passage supports (a loop's repeats once), else what the sources say
        grounding = self.ground(result.text, question, passages, mode)
        body = grounding.text or self.shown_answer("", quality, passages)
        return compose(triage.prefix, body), quality, grounding

    def grounding_mode(self, mode: str | None) -> str:
        return mode or self.settings.grounding

    def ground(self, text: str, question: str, passages: list[Passage], mode: str | None = None) -> Grounding:
        t0 = time.perf_counter()
        lexicon = self.evidence.lexicon if self.evidence is not None else frozenset()
        g = ground(text, passages, question, self.grounding_mode(mode), lexicon)  # type: ignore[arg-type]
        self._observe_grounding(g, time.perf_counter() - t0)
        return g

    def gate(self, question: str, passages: list[Passage], mode: str | None = None) -> SentenceGate:
        """A stream's sentence gate: sentences are released only once complete and checked."""
        lexicon = self.evidence.lexicon if self.evidence is not None else frozenset()
        checker = Checker(passages, question, lexicon) if passages else None
        return SentenceGate(checker, self.grounding_mode(mode))  # type: ignore[arg-type]

    def finish_stream(
        self, gate: SentenceGate, result: GenerationResult, question: str, triage: Triage
    ) -> tuple[str, str, Quality, Grounding]:
        """The end of a grounded stream: the text still to send, the delivered answer (exactly what was
        streamed after the advice), the quality gate and the grounding."""
        quality = self.quality(result.text, question, result.perplexity)
        t0 = time.perf_counter()
        tail, grounding = gate.close(question)
        self._observe_grounding(grounding, time.perf_counter() - t0)
        if gate.checker is None and quality.degenerate:  # unchecked text: the plain answer's verdict
            return tail, compose(triage.prefix, self.shown_answer(result.text, quality, [])), quality, grounding
        if not grounding.text and quality.degenerate:  # nothing released: say so, as the plain answer does
            tail = grounding.text = self.shown_answer("", quality, [])
        return tail, compose(triage.prefix, grounding.text), quality, grounding

    def _observe_grounding(self, g: Grounding, seconds: float) -> None:
        self.metrics.grounding_seconds.observe(seconds)
        self.metrics.answer_source.labels(g.answer_source).inc()
        report = g.public()
        self.metrics.grounding_sentences.labels("supported").inc(report["supported"])
        self.metrics.grounding_sentences.labels("withheld").inc(report["withheld"])

    def refusal(self, triage: Triage) -> str:
        """The answer to an out-of-scope question: the rule file's refusal, no model call."""
        assert self.safety is not None
        return compose(triage.prefix, self.safety.refusal_for(triage))

    def events(self, events: list[str]) -> StreamingResponse:
        """A stream whose every event is known up front (a refusal: no model call)."""

        async def gen() -> AsyncIterator[str]:
            for event in events:
                yield event

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    def shown_answer(text: str, quality: Quality, passages: list[Passage] | None = None) -> str:
        """What a client reads as the answer: the model's text, or a plain statement that there
        is none, pointing at the evidence a clinician can read instead."""
        if not quality.degenerate:
            return text.strip()
        out = withheld(quality)
        if passages:
            out += "\nEvidence you can check:\n" + "\n".join(
                f"[{i}] {p.title} ({p.source}{', ' + p.url if p.url else ''})" for i, p in enumerate(passages, 1)
            )
        return out

    # ---- helpers --------------------------------------------------------------
    def check_context(self, prompt_tokens: int, max_new: int, param: str) -> None:
        engine, _ = self.require_ready()
        limit = engine.context_length
        if prompt_tokens + max_new > limit:
            raise ApiError(
                400,
                "context_length_exceeded",
                f"prompt ({prompt_tokens} tokens) + {param} ({max_new}) exceeds the model's context of {limit} tokens; "
                f"shorten the question or lower {param} to at most {max(limit - prompt_tokens, 0)}",
                param,
            )

    def note(self, request: Request, prompt_tokens: int, completion_tokens: int, **texts: str) -> None:
        """Token counts (and, if audit is on, text digests) for the access log line."""
        request.scope.setdefault("state", {})
        state = request.scope["state"]
        state["prompt_tokens"] = state.get("prompt_tokens", 0) + prompt_tokens
        state["completion_tokens"] = state.get("completion_tokens", 0) + completion_tokens
        if self.settings.audit_hashes:
            state.setdefault("audit", {}).update({f"{k}_sha256": text_digest(v) for k, v in texts.items()})
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion_tokens)

    async def _await(self, fut: asyncio.Future, request: Request, cancelled: threading.Event, deadline: float) -> Any:
        """Wait for a scheduled job until its deadline; a client that leaves frees its slot."""
        timeout = ApiError(504, "timeout", f"request took longer than {self.settings.request_timeout_s:g}s")
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise timeout
                done, _ = await asyncio.wait({fut}, timeout=min(0.5, remaining))
                if done:
                    try:
                        return fut.result()
                    except DeadlineExceeded:  # dropped unrun at its deadline by the scheduling policy
                        raise timeout from None
                    except EngineError as exc:  # the engine says what went wrong (an upstream's failure)
                        raise ApiError(exc.status, exc.type, exc.message) from None
                if self.drain_expired:
                    raise self._shutting_down()
                if not self.draining and await request.is_disconnected():
                    # (while draining, the server itself reports clients as gone: not a reason to stop)
                    raise asyncio.CancelledError("client disconnected")
        except asyncio.CancelledError:
            raise ApiError(499, "client_closed_request", "client closed the request") from None
        finally:
            if not fut.done():
                cancelled.set()
                fut.cancel()

    def _schedule(
        self, request: Request, submit: Callable[[str | None, float], asyncio.Future]
    ) -> tuple[asyncio.Future, float]:
        """Queue work under the caller's key with the request's one deadline: the policy drops the
        work unrun once it has passed, and the waiter answers 504 at that same instant."""
        arrived = (request.scope.get("state") or {}).get("arrived") or time.monotonic()
        deadline = arrived + self.settings.request_timeout_s
        try:
            return submit(self._key(request), deadline), deadline
        except QueueFull as exc:
            raise ApiError(429, "queue_full", exc.message, headers={"Retry-After": "1"}) from None

    @staticmethod
    def _key(request: Request) -> str | None:
        """The unit of fair shares: the caller's API key id; without keys, the client's address (one
        client's burst must not take every slot from the others; behind a proxy every client has the
        proxy's address: use keys there)."""
        key = (request.scope.get("state") or {}).get("key_id")
        if key is None and request.client is not None:
            return f"addr:{request.client.host}"
        return key

    # ---- generation -------------------------------------------------------------
    async def generate(self, request: Request, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        t0 = time.perf_counter()
        _, scheduler = self.require_ready()
        job = GenerationJob(prompt_ids, params)
        fut, deadline = self._schedule(request, lambda key, deadline: scheduler.generate(job, key, deadline))
        result: GenerationResult = await self._await(fut, request, job.cancelled, deadline)
        self._observe(t0, result)
        return result

    def _observe(self, t0: float, result: GenerationResult) -> None:
        if result.first_token_at is not None:
            self.metrics.ttft.observe(max(result.first_token_at - t0, 0.0))
        if result.perplexity is not None and result.completion_tokens:
            self.metrics.answer_perplexity.observe(result.perplexity)

    def stream(
        self,
        request: Request,
        prompt_ids: list[int],
        params: SamplingParams,
        on_piece: Callable[[str], str],
        on_done: Callable[[GenerationResult], list[str]],
        audit: dict[str, str] | None = None,
        preamble: list[str] | None = None,
    ) -> StreamingResponse:
        """Server-Sent Events: the preamble (fixed safety advice), one event per piece of text,
        then the closing events."""
        t0 = time.perf_counter()
        _, scheduler = self.require_ready()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        job = GenerationJob(prompt_ids, params, on_text=lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p))
        fut, deadline = self._schedule(request, lambda key, deadline: scheduler.generate(job, key, deadline))

        async def events() -> AsyncIterator[str]:
            try:
                for event in preamble or []:
                    yield event
                while True:
                    if self.drain_expired:  # shutting down: end the stream with a clear event, free the row
                        err = self._shutting_down()
                        yield sse(err.body(), "error")
                        return
                    getter = asyncio.ensure_future(pieces.get())
                    done, _ = await asyncio.wait(
                        {getter, fut},
                        timeout=min(0.5, max(deadline - time.monotonic(), 0)),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if getter in done:
                        yield on_piece(getter.result())
                        continue
                    getter.cancel()
                    if not done and time.monotonic() < deadline:
                        continue
                    if not done:
                        yield sse(error_body("timeout", "request timed out"), "error")
                        return
                    while not pieces.empty():
                        yield on_piece(pieces.get_nowait())
                    exc = fut.exception()
                    if isinstance(exc, DeadlineExceeded):  # dropped unrun at its deadline
                        yield sse(error_body("timeout", "request timed out"), "error")
                        return
                    if isinstance(exc, EngineError):
                        yield sse(error_body(exc.type, exc.message), "error")
                        return
                    if exc is not None:
                        yield sse(error_body("engine_error", "generation failed"), "error")
                        return
                    result = fut.result()
                    self._observe(t0, result)
                    # on_done notes the delivered answer's digest: what the client was given
                    self.note(request, result.prompt_tokens, result.completion_tokens, **(audit or {}))
                    for event in on_done(result):
                        yield event
                    return
            finally:
                job.cancelled.set()  # a no-op when finished; frees the slot when the client left
                if not fut.done():
                    fut.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- scoring ------------------------------------------------------------------
    async def score(self, request: Request, items: list[ScoreItem]) -> list:
        _, scheduler = self.require_ready()
        cancelled = threading.Event()
        fut, deadline = self._schedule(request, lambda key, deadline: scheduler.score(items, key, deadline, cancelled))
        return await self._await(fut, request, cancelled, deadline)

    async def call(self, request: Request, fn: Callable[[EngineBase], Any]) -> Any:
        _, scheduler = self.require_ready()
        cancelled = threading.Event()
        fut, deadline = self._schedule(request, lambda key, deadline: scheduler.call(fn, key, deadline, cancelled))
        return await self._await(fut, request, cancelled, deadline)


def sse(obj: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
