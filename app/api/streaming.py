"""Scheduled work seen from a request: its one deadline, waiting for it, streaming it as Server-Sent
Events, and the one mapping from a failure to an HTTP error or a stream's ``error`` event.

Every generating and scoring route submits through a ``Runner``: work is queued under the caller's
fair-share key with a deadline that runs from the request's arrival (the gateway stamps it), the
scheduling policy drops it unrun once that has passed, and the waiter answers 504 at the same instant.
A client that leaves frees its slot; a drain that runs out ends what is left with 503 / an error event.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.api.security import text_digest
from app.engine.base import EngineBase, EngineError, GenerationJob, GenerationResult, SamplingParams, ScoreItem
from app.engine.policy import DeadlineExceeded, QueueFull
from app.engine.scheduler import Scheduler
from app.errors import ApiError, shutting_down
from app.metrics import Metrics
from app.settings import Settings

DONE = "data: [DONE]\n\n"  # the end of an OpenAI stream
SSE_HEADERS = {"Cache-Control": "no-cache"}
POLL_S = 0.5  # how often a waiter looks at the client, the deadline and the drain


class Relay:
    """A stream's text on its way from the engine thread to the event loop: the first piece at once, then
    at most one hand-over per ``interval_s`` (what the model wrote meanwhile goes with it); what is held when
    the job ends is taken by the loop (``rest``).

    Each hand-over is a ``call_soon_threadsafe`` (the event loop woken) and an SSE event through the HTTP
    stack, which the client parses. Per token at one user that was 0.31-0.43 ms of event-loop and 0.35-0.42 ms
    of client CPU, and the engine thread waited for the interpreter lock behind the loop's work on every
    token; at 20 ms they fell to 0.11 and 0.13-0.15 ms and tokens/s rose 30-42% (two cores;
    benchmarks/stream_cpu.py). A held piece waits at most until the stream's next piece or its end."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        put: Callable[[str], None],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loop, self.put, self.interval_s, self.clock = loop, put, interval_s, clock
        self.held: list[str] = []
        self.last = -math.inf  # when the last hand-over left: the first piece never waits

    def __call__(self, piece: str) -> None:
        """On the engine thread, for each piece of text the model writes."""
        self.held.append(piece)
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            text = "".join(self.held)
            self.held.clear()
            self.loop.call_soon_threadsafe(self.put, text)

    def rest(self) -> str:
        """On the loop, once the job has ended (the engine writes no more): the text still held."""
        text = "".join(self.held)
        self.held.clear()
        return text


def sse(obj: BaseModel | dict[str, Any], event: str | None = None) -> str:
    """One Server-Sent Event; a model is written with the fields that were set (OpenAI's chunks leave
    out what does not apply, and always carry ``finish_reason`` and ``logprobs``, null or not)."""
    data = obj.model_dump(exclude_unset=True) if isinstance(obj, BaseModel) else obj
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_for(exc: BaseException, timeout_s: float) -> ApiError:
    """The one mapping from what went wrong with scheduled work to what a client is told."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DeadlineExceeded | TimeoutError):  # dropped unrun at its deadline, or still running at it
        return ApiError(504, "timeout", f"request took longer than {timeout_s:g}s")
    if isinstance(exc, QueueFull):
        return ApiError(429, "queue_full", exc.message, headers={"Retry-After": "1"})
    if isinstance(exc, EngineError):  # the engine says what went wrong (an upstream's failure)
        return ApiError(exc.status, exc.type, exc.message)
    return ApiError(500, "engine_error", "generation failed")


def error_event(exc: BaseException, timeout_s: float) -> str:
    """A stream that cannot go on ends with this event (its headers went out with status 200)."""
    return sse(error_for(exc, timeout_s).body(), "error")


def fixed_events(events: list[str]) -> StreamingResponse:
    """A stream whose every event is known up front (a refusal: no model call)."""

    async def gen() -> AsyncIterator[str]:
        for event in events:
            yield event

    return StreamingResponse(gen(), media_type="text/event-stream", headers=SSE_HEADERS)


class Lifecycle(Protocol):
    """What a waiter needs to know of the service's life (``app.serving.Serving``)."""

    settings: Settings
    metrics: Metrics
    draining: bool
    drain_expired: bool

    def require_ready(self, arrived: float | None = None) -> Any: ...


class Runner:
    """Submits a request's work to the scheduler and waits for it under the request's deadline."""

    def __init__(self, life: Lifecycle, scheduler: Scheduler) -> None:
        self.life, self.scheduler = life, scheduler
        self.timeout_s = life.settings.request_timeout_s

    @property
    def queue_share(self) -> int:
        """How many queued rows one caller may hold (a request larger than this is refused up front)."""
        return self.scheduler.policy.key_limit

    # ---- accounting for the access log -----------------------------------------
    def note(self, request: Request, prompt_tokens: int, completion_tokens: int, **texts: str) -> None:
        """Token counts (and, if audit is on, text digests, never text) for the access log line."""
        state = request.scope.setdefault("state", {})
        state["prompt_tokens"] = state.get("prompt_tokens", 0) + prompt_tokens
        state["completion_tokens"] = state.get("completion_tokens", 0) + completion_tokens
        if self.life.settings.audit_hashes:
            state.setdefault("audit", {}).update({f"{k}_sha256": text_digest(v) for k, v in texts.items()})
        self.life.metrics.prompt_tokens.inc(prompt_tokens)
        self.life.metrics.generation_tokens.inc(completion_tokens)

    # ---- submitting and waiting ---------------------------------------------------
    def _schedule(
        self, request: Request, submit: Callable[[str | None, float], asyncio.Future]
    ) -> tuple[asyncio.Future, float]:
        """Queue work under the caller's key with the request's one deadline (from its arrival)."""
        arrived = (request.scope.get("state") or {}).get("arrived") or time.monotonic()
        self.life.require_ready(arrived)  # an upstream outage, or a drain, that began while it was prepared
        deadline = arrived + self.timeout_s
        try:
            return submit(_key(request), deadline), deadline
        except QueueFull as exc:
            raise error_for(exc, self.timeout_s) from None

    async def _await(self, fut: asyncio.Future, request: Request, cancelled: threading.Event, deadline: float) -> Any:
        """Wait for a scheduled job until its deadline; a client that leaves frees its slot."""
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise error_for(TimeoutError(), self.timeout_s)
                done, _ = await asyncio.wait({fut}, timeout=min(POLL_S, remaining))
                if done:
                    try:
                        return fut.result()
                    except (DeadlineExceeded, EngineError) as exc:
                        raise error_for(exc, self.timeout_s) from None
                if self.life.drain_expired:
                    raise shutting_down()
                if not self.life.draining and await request.is_disconnected():
                    # (while draining, the server itself reports clients as gone: not a reason to stop)
                    raise asyncio.CancelledError("client disconnected")
        except asyncio.CancelledError:
            raise ApiError(499, "client_closed_request", "client closed the request") from None
        finally:
            if not fut.done():
                cancelled.set()
                fut.cancel()

    async def generate(self, request: Request, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        t0 = time.perf_counter()
        job = GenerationJob(prompt_ids, params)
        fut, deadline = self._schedule(request, lambda key, deadline: self.scheduler.generate(job, key, deadline))
        result: GenerationResult = await self._await(fut, request, job.cancelled, deadline)
        self._observe(t0, result)
        return result

    async def score(self, request: Request, items: list[ScoreItem]) -> list:
        cancelled = threading.Event()
        fut, deadline = self._schedule(
            request, lambda key, deadline: self.scheduler.score(items, key, deadline, cancelled)
        )
        return await self._await(fut, request, cancelled, deadline)

    async def call(self, request: Request, fn: Callable[[EngineBase], Any]) -> Any:
        """Any other engine call (prompt log-probabilities), queued like generation."""
        cancelled = threading.Event()
        fut, deadline = self._schedule(request, lambda key, deadline: self.scheduler.call(fn, key, deadline, cancelled))
        return await self._await(fut, request, cancelled, deadline)

    def _observe(self, t0: float, result: GenerationResult) -> None:
        metrics = self.life.metrics
        if result.first_token_at is not None:
            metrics.ttft.observe(max(result.first_token_at - t0, 0.0))
        if result.perplexity is not None and result.completion_tokens:
            metrics.answer_perplexity.observe(result.perplexity)

    # ---- streaming --------------------------------------------------------------------
    def stream(
        self,
        request: Request,
        prompt_ids: list[int],
        params: SamplingParams,
        on_piece: Callable[[str], str],
        on_done: Callable[[GenerationResult], list[str]],
        preamble: list[str] | None = None,
    ) -> StreamingResponse:
        """The preamble (fixed safety advice), an event per piece of text the model writes (what ``on_piece``
        makes of it; pieces written within ``MEDASK_STREAM_INTERVAL_MS`` of each other leave together, see
        ``Relay``), then the closing events ``on_done`` makes of the result."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        relay = Relay(loop, pieces.put_nowait, self.life.settings.stream_interval_ms / 1000)
        job = GenerationJob(prompt_ids, params, on_text=relay)
        fut, deadline = self._schedule(request, lambda key, deadline: self.scheduler.generate(job, key, deadline))

        async def events() -> AsyncIterator[str]:
            try:
                for event in preamble or []:
                    yield event
                while True:
                    if self.life.drain_expired:  # shutting down: end the stream with a clear event, free the row
                        yield error_event(shutting_down(), self.timeout_s)
                        return
                    getter = asyncio.ensure_future(pieces.get())
                    done, _ = await asyncio.wait(
                        {getter, fut},
                        timeout=min(POLL_S, max(deadline - time.monotonic(), 0)),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if getter in done:
                        yield on_piece(getter.result())
                        continue
                    getter.cancel()
                    if not done and time.monotonic() < deadline:
                        continue
                    if not done:
                        yield error_event(TimeoutError(), self.timeout_s)
                        return
                    while not pieces.empty():
                        yield on_piece(pieces.get_nowait())
                    if held := relay.rest():
                        yield on_piece(held)
                    exc = fut.exception()
                    if exc is not None:
                        yield error_event(exc, self.timeout_s)
                        return
                    result = fut.result()
                    self._observe(t0, result)
                    self.note(request, result.prompt_tokens, result.completion_tokens)
                    for event in on_done(result):
                        yield event
                    return
            finally:
                job.cancelled.set()  # a no-op when finished; frees the slot when the client left
                if not fut.done():
                    fut.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _key(request: Request) -> str | None:
    """The unit of fair shares: the caller's API key id; without keys, the client's address (one
    client's burst must not take every slot from the others; behind a proxy every client has the
    proxy's address: use keys there)."""
    key = (request.scope.get("state") or {}).get("key_id")
    if key is None and request.client is not None:
        return f"addr:{request.client.host}"
    return key
