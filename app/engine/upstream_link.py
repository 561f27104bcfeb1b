"""The upstream engine's connection: one HTTP client on its own event loop thread, the breaker (a
monitor probes ``/v1/models``; the request path reports what it sees; ``unavailable()`` tells /ready),
the completion calls with retries before anything was sent, and the errors a client is told.
``app.engine.upstream.UpstreamEngine`` builds generation and scoring on it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from app.engine.base import (
    EngineBase,
    GenerationJob,
)
from app.engine.upstream_protocol import (
    ERROR_BODY_BYTES,
    ResponseTooLarge,
    UpstreamError,
    log_excerpt,
    prompt_entries,
    read_at_most,
    redact_url,
    response_cap,
)
from app.metrics import Metrics

log = logging.getLogger("medask.upstream")

# text of a short prompt used to learn whether the upstream can score prompts (echo + logprobs)
PROBE_TEXT = "Scoring probe: chest pain."
# between connection attempts: attempt i waits RETRY_BACKOFF_S * 2**i
RETRY_BACKOFF_S = 0.2
# how often the worker looks for finished upstream calls and room for queued work (app.engine.upstream)
POLL_S = 0.02


class UpstreamLink(EngineBase):
    """The connection half of the upstream engine (see the module docstring)."""

    name = "upstream"
    kernel = "upstream"
    device = "upstream"
    continuous_batching = True

    def __init__(
        self,
        tokenizer: Any,
        front: Any,
        folder: Path,
        manifest: dict[str, Any],
        config: dict[str, Any],
        load_seconds: float,
        *,
        url: str,
        metrics: Metrics,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 60.0,
        probe_s: float = 2.0,
        retries: int = 2,
        trust_env: bool = False,
        max_connections: int = 16,
        total_s: float = 120.0,
    ) -> None:
        super().__init__(tokenizer, folder, manifest, config, load_seconds, front)
        self.url = url.rstrip("/").removesuffix("/v1")  # the base URL, whether or not /v1 was given
        self.public_url = redact_url(self.url)  # what is shown: never the URL's credentials
        self.trust_env = trust_env
        self.metrics = metrics
        self.wanted_model = model
        self.timeout_s = timeout_s
        self.probe_s = probe_s
        self.retries = retries
        self.max_connections = max_connections  # a bounded pool: a 256-item batch must not open 256 connections
        self.total_s = total_s  # one call's whole life, however slowly the upstream drips
        # parsing and tokenizing upstream output runs here, never on the loop every upstream call shares
        self._cpu = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medask-upstream-cpu")
        self._cpu_tokenizer: Any = None  # a tokenizer of its own (fast tokenizers are not shared across threads)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.upstream_model: str | None = None
        self.down_reason: str | None = f"the upstream engine at {self.public_url} has not been reached yet"
        # why the upstream cannot score prompts (None: it can); learnt at each (re)connection
        self.score_problem: str | None = "not probed yet"
        self._eos_texts = tuple(t for t in (tokenizer.eos_token,) if t)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="medask-upstream", daemon=True)
        self._client: httpx.AsyncClient | None = None
        self._monitor: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._run(self._start())

    async def _start(self) -> None:
        # waiting for a free connection is bounded by the call's total deadline, not by the read timeout
        timeout = httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s), pool=None)
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        # proxies from HTTP(S)_PROXY would see the bearer key: followed only when asked (MEDASK_UPSTREAM_TRUST_ENV)
        self._client = httpx.AsyncClient(
            timeout=timeout, limits=limits, headers=self._headers, trust_env=self.trust_env
        )
        await self.probe()
        self._monitor = asyncio.ensure_future(self._watch())

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def _close() -> None:
            if self._monitor is not None:
                self._monitor.cancel()
            if self._client is not None:
                await self._client.aclose()

        with contextlib.suppress(Exception):
            self._run(_close(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._cpu.shutdown(wait=False, cancel_futures=True)

    def _run(self, coro: Any, timeout: float | None = None, cancelled: Callable[[], bool] | None = None) -> Any:
        """Run a coroutine on the engine's loop from another thread and wait for it; when ``cancelled``
        says so (its clients left, or their deadline passed) the coroutine is cancelled, which closes
        its upstream requests, and the caller gets an UpstreamError."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        if cancelled is None:
            return fut.result(timeout)
        while True:
            try:
                return fut.result(POLL_S * 5)
            except concurrent.futures.TimeoutError:
                if cancelled():
                    fut.cancel()
                    raise UpstreamError(499, "client_closed_request", "the request was cancelled") from None

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """CPU work on upstream output (JSON, tokenizing), off the loop that all upstream calls share."""
        return await self._loop.run_in_executor(self._cpu, fn, *args)

    def _encode_off_loop(self, text: str) -> list[int]:
        if self._cpu_tokenizer is None:
            self._cpu_tokenizer = copy.deepcopy(self.front)
        return self._cpu_tokenizer(text, add_special_tokens=False)["input_ids"]

    def unavailable(self) -> str | None:
        return self.down_reason

    # ---- the breaker ------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            with contextlib.suppress(Exception):
                await self.probe()

    async def probe(self) -> None:
        """Is the upstream there, serving the model we want? Closes or opens the breaker."""
        assert self._client is not None
        t0 = time.perf_counter()
        try:
            r = await self._client.get(f"{self.url}/v1/models", timeout=min(5.0, self.timeout_s))
        except httpx.HTTPError as exc:
            self._down(f"cannot reach the upstream engine at {self.public_url} ({type(exc).__name__})", "connect")
            return
        self.metrics.upstream_latency.labels("probe").observe(time.perf_counter() - t0)
        if r.status_code != 200:
            self._down(f"the upstream engine at {self.public_url} answered {r.status_code} to GET /v1/models", "status")
            return
        try:
            ids = [str(m["id"]) for m in r.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            self._down(f"the upstream engine at {self.public_url} sent a model list that is not OpenAI's", "protocol")
            return
        if not ids:
            self._down(f"the upstream engine at {self.public_url} serves no model", "status")
            return
        if self.wanted_model and self.wanted_model not in ids:
            self._down(
                f"the upstream engine at {self.public_url} serves {ids}, not {self.wanted_model!r} (MEDASK_UPSTREAM_MODEL)",
                "model",
            )
            return
        model = self.wanted_model or ids[0]
        if self.down_reason is not None or model != self.upstream_model:
            self.upstream_model = model
            self.score_problem = await self._scoring_problem()
            if self.score_problem:
                log.warning(
                    "upstream cannot score prompts: /perplexity answers 501, answers without log-probs get "
                    "perplexity null",
                    extra={"event": "upstream_cannot_score", "reason": self.score_problem},
                )
        self._up()

    async def _scoring_problem(self) -> str | None:
        ids = self.encode(PROBE_TEXT)
        try:
            body = await self._post(self._echo_body(ids, 1), "probe")
        except UpstreamError as exc:
            return f"the upstream refused echo + logprobs: {exc.message}"
        got = prompt_entries(body, len(ids))
        return got if isinstance(got, str) else None

    async def _echoed(self, ids: list[int], top_k: int = 1) -> tuple[list[str], list[float | None], list[Any]]:
        """The upstream's log-probabilities of a prompt's own tokens (echo + logprobs)."""
        entries = prompt_entries(await self._post(self._echo_body(ids, top_k), "score"), len(ids))
        if isinstance(entries, str):
            raise UpstreamError(502, "upstream_error", f"the upstream engine could not score: {entries}")
        return entries

    def _down(self, reason: str, why: str) -> None:
        self.metrics.upstream_errors.labels(why).inc()
        if self.down_reason != reason:
            log.warning("upstream unavailable", extra={"event": "upstream_down", "reason": reason})
        self.down_reason = reason
        self.metrics.upstream_up.labels(self.public_url).set(0)

    def _up(self) -> None:
        if self.down_reason is not None:
            log.info("upstream available", extra={"event": "upstream_up", "model": self.upstream_model})
        self.down_reason = None
        self.metrics.upstream_up.labels(self.public_url).set(1)

    # ---- HTTP ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _completion(self, body: dict[str, Any], kind: str) -> AsyncIterator[httpx.Response]:
        """POST /v1/completions, the response open for reading. A connection that could not be made
        is retried (nothing was sent); nothing else is. Every failure, while connecting or while
        reading in the caller's block, becomes an UpstreamError that says what happened."""
        assert self._client is not None
        t0 = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                async with self._client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                    if r.status_code >= 400:
                        start, _ = await read_at_most(r, ERROR_BODY_BYTES)
                        raise self._refused(r.status_code, start.decode(errors="replace"))
                    yield r
                self.metrics.upstream_latency.labels(kind).observe(time.perf_counter() - t0)
                return
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # raised before the block ever runs
                if attempt == self.retries:
                    raise self._unreachable(exc) from None
                await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
            except httpx.TimeoutException:
                raise self._timeout() from None
            except (httpx.HTTPError, ResponseTooLarge) as exc:
                raise self._broken(exc) from None

    async def _post(self, body: dict[str, Any], kind: str) -> dict[str, Any]:
        cap = response_cap(int(body.get("max_tokens") or 1) + len(body.get("prompt") or []))
        try:
            async with asyncio.timeout(self.total_s):
                async with self._completion(body, kind) as r:
                    raw, more = await read_at_most(r, cap)
                    if more:  # more than was asked for: read no further
                        raise self._broken(ResponseTooLarge(f"more than {cap} bytes"))
        except TimeoutError:
            raise self._too_long() from None
        try:
            return await self._offload(json.loads, raw)
        except ValueError:
            raise self._broken(ValueError("a body that is not JSON")) from None

    def _too_long(self) -> UpstreamError:
        self.metrics.upstream_errors.labels("timeout").inc()
        return UpstreamError(
            504,
            "upstream_timeout",
            f"the upstream engine took longer than {self.total_s:g}s in all (MEDASK_UPSTREAM_TOTAL_S); the call was cancelled",
        )

    def _unreachable(self, exc: BaseException) -> UpstreamError:
        reason = f"cannot reach the upstream engine at {self.public_url} ({type(exc).__name__})"
        self._down(reason, "connect")
        return UpstreamError(503, "upstream_unavailable", reason)

    def _timeout(self) -> UpstreamError:
        self.metrics.upstream_errors.labels("timeout").inc()
        return UpstreamError(
            504,
            "upstream_timeout",
            f"the upstream engine sent nothing for {self.timeout_s:g}s (MEDASK_UPSTREAM_TIMEOUT_S)",
        )

    def _broken(self, exc: BaseException) -> UpstreamError:
        self.metrics.upstream_errors.labels("protocol").inc()
        self._loop.call_soon(lambda: asyncio.ensure_future(self.probe()))  # is it gone? /ready should know now
        return UpstreamError(
            502, "upstream_error", f"the upstream engine broke off the response ({type(exc).__name__})"
        )

    def _refused(self, status: int, text: str) -> UpstreamError:
        """A fixed message for the client (an upstream's text may echo headers, keys or megabytes); the
        details go to the log, truncated and with keys blanked (OWASP API10)."""
        self.metrics.upstream_errors.labels("status").inc()
        log.warning(
            "upstream refused a request",
            extra={"event": "upstream_refused", "status": status, "detail": log_excerpt(text)},
        )
        return UpstreamError(502, "upstream_error", f"the upstream engine answered {status} (details in the log)")

    def _echo_body(self, ids: list[int], top_k: int) -> dict[str, Any]:
        # max_tokens 1, not 0: every OpenAI-compatible server accepts it (lm-eval asks the same)
        return {
            "model": self.upstream_model,
            "prompt": ids,
            "echo": True,
            "logprobs": max(top_k, 1),
            "max_tokens": 1,
            "temperature": 0.0,
        }

    def _generation_body(self, job: GenerationJob, stream: bool) -> dict[str, Any]:
        p = job.params
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "prompt": job.prompt_ids,
            "max_tokens": p.max_new_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "logprobs": max(p.top_logprobs, 1),
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body
