"""The handler object the routes call: owns the engine and scheduler, turns
requests into engine jobs, and maps every failure to a clear HTTP error.

Routes stay thin (validate, call one method here, shape the response); no
model logic lives in them, and nothing here imports FastAPI routing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.engine import CheckpointError, Engine, GenerationJob, GenerationResult, SamplingParams, ScoreItem
from app.metrics import Metrics
from app.scheduler import QueueFull, Scheduler
from app.security import text_digest
from app.settings import Settings

log = logging.getLogger("medask.serving")


class ApiError(Exception):
    """An error with its HTTP status and the project's error shape."""

    def __init__(
        self, status: int, type_: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.param = status, type_, message, param
        self.headers = headers or {}


class Serving:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.ready = False
        self.load_error: str | None = None
        self.state = "starting"

    # ---- lifecycle ----------------------------------------------------------
    def load(self) -> None:
        """Load the checkpoint once, start the worker, warm up; then ready."""
        s = self.settings
        self.state = "loading"
        try:
            engine = Engine.load(s.model_dir, device=s.device, dtype=s.dtype, threads=s.threads)
        except CheckpointError as exc:
            self.load_error = str(exc)
            self.state = "failed"
            raise
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
        )
        self.scheduler.start()
        if s.warmup:
            self.state = "warming_up"
            prompt = engine.encode_question(
                "Warm-up: a patient has a mild headache. What next?", "General Practitioner"
            )
            result = engine.generate([GenerationJob(prompt, SamplingParams(max_new_tokens=4))])[0]
            if result.finish_reason not in ("stop", "length"):
                raise CheckpointError("warm-up generation failed")
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

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        if self.engine is not None and self.engine.manifest.get("name"):
            return str(self.engine.manifest["name"])
        return self.settings.model_dir.name

    def require_ready(self) -> tuple[Engine, Scheduler]:
        if not self.ready or self.engine is None or self.scheduler is None:
            reason = self.load_error or f"model is {self.state.replace('_', ' ')}"
            raise ApiError(503, "service_unavailable", f"not ready: {reason}", headers={"Retry-After": "5"})
        return self.engine, self.scheduler

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

    async def _await(self, fut: asyncio.Future, request: Request, cancelled: threading.Event | None) -> Any:
        """Wait for a scheduled job under the request timeout; a client that leaves frees its slot."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ApiError(504, "timeout", f"request took longer than {self.settings.request_timeout_s:g}s")
                done, _ = await asyncio.wait({fut}, timeout=min(0.5, remaining))
                if done:
                    return fut.result()
                if await request.is_disconnected():
                    raise asyncio.CancelledError("client disconnected")
        except asyncio.CancelledError:
            raise ApiError(499, "client_closed_request", "client closed the request") from None
        finally:
            if not fut.done():
                if cancelled is not None:
                    cancelled.set()
                fut.cancel()

    def _schedule(self, submit: Callable[[], asyncio.Future]) -> asyncio.Future:
        try:
            return submit()
        except QueueFull:
            raise ApiError(
                429, "queue_full", "the server is at capacity; retry shortly", headers={"Retry-After": "1"}
            ) from None

    # ---- generation -------------------------------------------------------------
    async def generate(self, request: Request, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        t0 = time.perf_counter()
        _, scheduler = self.require_ready()
        job = GenerationJob(prompt_ids, params)
        fut = self._schedule(lambda: scheduler.generate(job))
        result: GenerationResult = await self._await(fut, request, job.cancelled)
        self._observe(t0, result)
        return result

    def _observe(self, t0: float, result: GenerationResult) -> None:
        if result.first_token_at is not None:
            self.metrics.ttft.observe(max(result.first_token_at - t0, 0.0))
        if result.token_ids:
            self.metrics.answer_perplexity.observe(result.score.perplexity)

    def stream(
        self,
        request: Request,
        prompt_ids: list[int],
        params: SamplingParams,
        on_piece: Callable[[str], str],
        on_done: Callable[[GenerationResult], list[str]],
        audit: dict[str, str] | None = None,
    ) -> StreamingResponse:
        """Server-Sent Events: one event per piece of text, then the closing events."""
        t0 = time.perf_counter()
        _, scheduler = self.require_ready()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        job = GenerationJob(prompt_ids, params, on_text=lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p))
        fut = self._schedule(lambda: scheduler.generate(job))
        deadline = time.monotonic() + self.settings.request_timeout_s

        async def events() -> AsyncIterator[str]:
            try:
                while True:
                    getter = asyncio.ensure_future(pieces.get())
                    done, _ = await asyncio.wait(
                        {getter, fut}, timeout=max(deadline - time.monotonic(), 0), return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter in done:
                        yield on_piece(getter.result())
                        continue
                    getter.cancel()
                    if not done:
                        yield sse(
                            {"error": {"type": "timeout", "message": "request timed out", "param": None}}, "error"
                        )
                        return
                    while not pieces.empty():
                        yield on_piece(pieces.get_nowait())
                    exc = fut.exception()
                    if exc is not None:
                        yield sse(
                            {"error": {"type": "engine_error", "message": "generation failed", "param": None}}, "error"
                        )
                        return
                    result = fut.result()
                    self._observe(t0, result)
                    self.note(request, result.prompt_tokens, len(result.token_ids), **(audit or {}), answer=result.text)
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
        fut = self._schedule(lambda: scheduler.score(items))
        return await self._await(fut, request, None)

    async def call(self, request: Request, fn: Callable[[Engine], Any]) -> Any:
        _, scheduler = self.require_ready()
        fut = self._schedule(lambda: scheduler.call(fn))
        return await self._await(fut, request, None)


def sse(obj: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
