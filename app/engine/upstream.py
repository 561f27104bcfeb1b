"""The upstream engine: an OpenAI-compatible server (vLLM, TGI, llama.cpp's server, another
MedAsk) computes; MedAsk keeps everything that makes it MedAsk.

The prompt is rendered and tokenized here, from the checkpoint folder's own tokenizer and
chat template, and sent as token ids to the upstream's ``/v1/completions``: roles, history,
evidence, triage, the quality gate, fairness and audit stay ours, and the upstream sees
exactly the tokens the local engine would have run. Log-probabilities come back with the
generation; when an upstream gives none, the answer is scored with ``echo`` + ``logprobs``
(the prompt's own log-probabilities); when it cannot do that either, there is no perplexity
(``score_problem`` says why), never a made-up number.

Failures: connection errors are retried (nothing was sent yet); nothing else is, since a
generation that started must not run twice. A monitor probes ``/v1/models`` and the request
path reports what it sees, so ``unavailable()`` (and /ready) tells the truth while the
upstream is down: a circuit breaker, closed again by the first successful probe.

Threads: the scheduler's worker thread calls ``generate``/``score``/``prompt_logprobs`` as it
does for the local engine; the HTTP work runs concurrently on this engine's own event loop
thread, so up to ``max_rows`` generations are in flight upstream at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from app.clinical.scoring import Score, score_from_logprobs
from app.engine.base import (
    EngineBase,
    EngineError,
    GenerationJob,
    GenerationResult,
    PromptLogprobs,
    ScoreItem,
    open_checkpoint,
    text_offsets,
)
from app.metrics import Metrics

log = logging.getLogger("medask.upstream")

# text of a short prompt used to learn whether the upstream can score prompts (echo + logprobs)
PROBE_TEXT = "Scoring probe: chest pain."
# between connection attempts: attempt i waits RETRY_BACKOFF_S * 2**i
RETRY_BACKOFF_S = 0.2
# how often the worker looks for finished upstream calls and room for queued work
POLL_S = 0.02


class UpstreamError(EngineError):
    """The upstream failed a request; ``status``/``type`` are what MedAsk's client is told."""


# ---- pure parsing (tested without a server) --------------------------------------------


# an upstream's error body is read at most this far, and at most this much of it is logged
ERROR_BODY_BYTES = 4096
ERROR_LOG_CHARS = 200
_BEARER = re.compile(r"(?i)(bearer\s+|api[_-]?key[\"'=:\s]+)[^\s\"',}]+")


def redact_url(url: str) -> str:
    """The URL without its credentials (``http://user:pass@host`` -> ``http://***@host``): what may be
    shown in /ready, errors, logs, /info and metric labels."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def log_excerpt(text: str) -> str:
    """An upstream's error text as it may be logged: bearer keys and API keys blanked, cut short."""
    return _BEARER.sub(lambda m: m.group(1) + "***", text)[:ERROR_LOG_CHARS]


def _logprob(x: Any) -> float | None:
    """A log-probability as a float when it is one (a finite number <= 0, not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x > 0:
        return None
    return float(x)


def _tops(t: Any) -> dict[str, float] | None:
    if not t:
        return {}
    if not isinstance(t, dict) or not all(isinstance(k, str) and _logprob(v) is not None for k, v in t.items()):
        return None
    return {k: float(v) for k, v in t.items()}


def split_logprobs(
    block: dict[str, Any] | None, finish: str | None, eos_texts: Sequence[str]
) -> tuple[list[str], list[float], list[dict[str, float]] | None, tuple[float, dict[str, float] | None] | None] | None:
    """(token texts, log-probs, top alternatives, end-of-sequence entry) of a completion's
    ``logprobs`` block, or None when it has none a perplexity can be computed from.

    A trailing entry whose text is empty (or the EOS token's own text) on a ``stop`` finish is
    the end-of-sequence token, as vLLM and MedAsk report it: not part of the answer."""
    if not isinstance(block, dict):
        return None
    tokens, lps = block.get("tokens"), block.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(lps, list) or len(tokens) != len(lps):
        return None
    # every log-probability a finite number <= 0 and every token a string, or the answer is unscored
    # (one NaN would make every perplexity metric NaN for good, and 1e304 is no perplexity)
    if any(_logprob(x) is None for x in lps) or any(not isinstance(t, str) for t in tokens):
        return None
    tops = block.get("top_logprobs")
    tops = [_tops(t) for t in tops] if isinstance(tops, list) and len(tops) == len(tokens) else None
    if tops is not None and any(t is None for t in tops):
        tops = None  # malformed alternatives: the answer keeps its log-probs, without alternatives
    tokens, lps = list(tokens), [float(x) for x in lps]
    eos = None
    if finish == "stop" and tokens and tokens[-1] in ("", *eos_texts):
        tokens.pop()
        eos = (lps.pop(), tops.pop() if tops else None)
    return tokens, lps, tops, eos


def prompt_entries(body: dict[str, Any], n: int) -> tuple[list[str], list[float | None], list[Any]] | str:
    """The first ``n`` entries (the prompt's own tokens) of an echo + logprobs completion, or the
    reason they are not there: the first token has no prediction (None), every other a number."""
    try:
        block = body["choices"][0]["logprobs"]
        tokens, lps = block["tokens"], block["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        return "its completions carry no logprobs block for an echoed prompt"
    if not isinstance(tokens, list) or not isinstance(lps, list) or len(lps) < n or len(tokens) < n:
        return f"it returned {len(lps) if isinstance(lps, list) else 0} log-probs for a {n}-token echoed prompt"
    if any(_logprob(x) is None for x in lps[1:n]) or any(not isinstance(t, str) for t in tokens[:n]):
        return "its echoed prompt tokens carry no valid log-probabilities (each a finite number <= 0)"
    tops = block.get("top_logprobs")
    tops = list(tops[:n]) if isinstance(tops, list) and len(tops) >= n else [None] * n
    return list(tokens[:n]), [None, *(float(x) for x in lps[1:n])], tops


def sse_payloads(line: str) -> dict[str, Any] | None:
    """The JSON object of one ``data:`` line of an SSE stream (None for anything else)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def finish_of(reason: Any) -> str:
    """MedAsk's finish reason for an upstream's (``length`` for anything unknown)."""
    return "stop" if reason == "stop" else "length"


# a response is read at most this far: a base for the JSON around the text, and a generous allowance per token
# asked for (a token is a few bytes; its log-probs and alternatives a few hundred)
RESPONSE_BYTES_BASE = 256 * 1024
RESPONSE_BYTES_PER_TOKEN = 4096


class ResponseTooLarge(Exception):
    """The upstream sent more than MedAsk asked it for."""


def response_cap(max_tokens: int) -> int:
    return RESPONSE_BYTES_BASE + RESPONSE_BYTES_PER_TOKEN * max(max_tokens, 1)


async def bounded_lines(response: httpx.Response, cap: int) -> AsyncIterator[str]:
    """The lines of a streamed body, never holding more than ``cap`` bytes: an endless line or an
    endless stream is cut off (ResponseTooLarge), not buffered until memory runs out."""
    buffer = b""
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > cap:
            raise ResponseTooLarge(f"more than {cap} bytes")
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.rstrip(b"\r").decode(errors="replace")
    if buffer:
        yield buffer.decode(errors="replace")


async def read_at_most(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """A response body, never more than ``limit`` bytes read (an 8 MB page is not read), and whether
    there was more."""
    out = bytearray()
    async for chunk in response.aiter_bytes():
        out += chunk
        if len(out) > limit:
            return bytes(out[:limit]), True
    return bytes(out), False


# ---- the engine -------------------------------------------------------------------------


class UpstreamEngine(EngineBase):
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

    @classmethod
    def load(cls, folder: Path, metrics: Metrics, **kwargs: Any) -> UpstreamEngine:
        """The checkpoint's text side from ``folder`` (verified like any checkpoint), then the
        first probe of the upstream: down at start is not a failure, /ready says so until it is up."""
        t0 = time.perf_counter()
        tokenizer, front, manifest, config = open_checkpoint(Path(folder))
        engine = cls(tokenizer, front, Path(folder), manifest, config, 0.0, metrics=metrics, **kwargs)
        engine.start()
        engine.load_seconds = time.perf_counter() - t0
        return engine

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._run(self._start())

    async def _start(self) -> None:
        timeout = httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
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

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the engine's loop from another thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

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
        async with self._completion(body, kind) as r:
            raw, more = await read_at_most(r, cap)
            if more:  # more than was asked for: read no further
                raise self._broken(ResponseTooLarge(f"more than {cap} bytes"))
        try:
            return json.loads(raw)
        except ValueError:
            raise self._broken(ValueError("a body that is not JSON")) from None

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

    # ---- one generation -----------------------------------------------------------------
    async def _generate(self, job: GenerationJob) -> GenerationResult:
        if self.down_reason is not None:
            raise UpstreamError(503, "upstream_unavailable", self.down_reason)
        if job.on_text is None:
            body = await self._post(self._generation_body(job, stream=False), "generate")
            first_at = time.perf_counter()
            try:
                choice = body["choices"][0]
                text, finish, block = str(choice.get("text") or ""), choice.get("finish_reason"), choice.get("logprobs")
            except (KeyError, IndexError, TypeError):
                raise self._broken(ValueError("a completion without choices")) from None
            usage = (body.get("usage") or {}).get("completion_tokens")
        else:
            text, finish, block, usage, first_at = await self._stream(job)
        return await self._result(job, text, finish, block, usage, first_at)

    async def _stream(self, job: GenerationJob) -> tuple[str, Any, dict[str, Any] | None, int | None, float | None]:
        """Stream a generation, handing each piece of text to the job as it comes."""
        assert self._client is not None and job.on_text is not None
        body = self._generation_body(job, stream=True)
        text, finish, usage, first_at = "", None, None, None
        tokens: list[str] = []
        lps: list[Any] = []
        tops: list[Any] = []
        complete_logprobs = True
        pieces_left = job.params.max_new_tokens  # an upstream that ignores max_tokens is cut off here
        async with self._completion(body, "stream") as r:
            async for line in bounded_lines(r, response_cap(job.params.max_new_tokens)):
                obj = sse_payloads(line)
                if obj is None:
                    continue
                if obj.get("usage"):
                    usage = obj["usage"].get("completion_tokens")
                cut = False
                for choice in obj.get("choices") or []:
                    piece = str(choice.get("text") or "")
                    if piece and pieces_left <= 0:  # more text than was asked for: cut, never relayed
                        finish, cut = "length", True
                        break
                    block = choice.get("logprobs")
                    if isinstance(block, dict) and isinstance(block.get("tokens"), list):
                        tokens += block["tokens"]
                        lps += block.get("token_logprobs") or []
                        tops += block.get("top_logprobs") or [None] * len(block["tokens"])
                    elif piece:
                        complete_logprobs = False
                    if piece:
                        first_at = first_at or time.perf_counter()
                        text += piece
                        job.on_text(piece)
                        pieces_left -= 1
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                if cut:
                    break
            if finish is None:  # the stream ended without a finish: the upstream went away
                raise self._broken(ConnectionError("a stream that ended before its finish"))
        block = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops} if complete_logprobs else None
        return text, finish, block, usage, first_at

    async def _result(
        self, job: GenerationJob, text: str, finish: Any, block: Any, usage: int | None, first_at: float | None
    ) -> GenerationResult:
        p = job.params
        parsed = split_logprobs(block, finish, self._eos_texts)
        common = {"prompt_tokens": len(job.prompt_ids), "first_token_at": first_at}
        if parsed is not None and (parsed[0] or not text):
            pieces, lps, tops, eos = parsed
            return GenerationResult(
                text,
                [],
                lps,
                finish_of(finish),
                top=tops if p.top_logprobs > 0 else None,
                eos=eos,
                pieces=pieces,
                **common,
            )
        # no log-probs with the text: score the answer as the prompt's continuation, if the upstream can;
        # if that fails the answer is still delivered, unscored
        answer_ids = self.encode(text)
        if self.score_problem is None and answer_ids:
            n = len(job.prompt_ids)
            with contextlib.suppress(UpstreamError):
                tokens, lps, _ = await self._echoed(job.prompt_ids + answer_ids)
                return GenerationResult(
                    text,
                    [],
                    [float(x) for x in lps[n:] if x is not None],
                    finish_of(finish),
                    pieces=[str(t) for t in tokens[n:]],
                    **common,
                )
        return GenerationResult(
            text,
            [],
            [],
            finish_of(finish),
            scored=False,
            generated=usage if usage is not None else len(answer_ids),
            **common,
        )

    async def _until_cancelled(self, job: GenerationJob) -> GenerationResult:
        """The generation, cut short (and the upstream's request closed) when its client leaves."""
        task = asyncio.ensure_future(self._generate(job))
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            if job.cancelled.is_set() and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                return GenerationResult("", [], [], "cancelled", len(job.prompt_ids), None, scored=False)
        return task.result()

    # ---- what the scheduler asks (worker thread) ---------------------------------------
    def generate(
        self,
        jobs: Sequence[GenerationJob],
        admit: Callable[[int], Sequence[GenerationJob]] | None = None,
        on_finish: Callable[[GenerationJob, GenerationResult], None] | None = None,
        max_rows: int | None = None,
        on_error: Callable[[GenerationJob, BaseException], None] | None = None,
    ) -> list[GenerationResult]:
        """Run the jobs upstream concurrently; queued work joins as calls finish (the policy
        decides, exactly as for the local batch). Each job fails alone: ``on_error``."""
        limit = max_rows or len(jobs)
        results: dict[int, GenerationResult] = {}
        pending: dict[concurrent.futures.Future, GenerationJob] = {}

        def submit(batch: Sequence[GenerationJob]) -> None:
            for job in batch:
                pending[asyncio.run_coroutine_threadsafe(self._until_cancelled(job), self._loop)] = job

        submit(jobs)
        while pending:
            done, _ = concurrent.futures.wait(pending, timeout=POLL_S, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:
                    if on_error is None:
                        raise
                    on_error(job, exc)
                    continue
                results[id(job)] = result
                if on_finish is not None:
                    on_finish(job, result)
            if admit is not None:
                submit(admit(limit - len(pending)))
        return [results[id(job)] for job in jobs if id(job) in results]

    def _require_scoring(self) -> None:
        if self.down_reason is not None:
            raise UpstreamError(503, "upstream_unavailable", self.down_reason)
        if self.score_problem is not None:
            raise UpstreamError(
                501, "not_implemented", f"the upstream engine cannot score prompts: {self.score_problem}"
            )

    def score(self, items: Sequence[ScoreItem], batch_size: int = 16) -> list[Score]:
        """log p(target | context) per item, from the upstream's echoed prompt log-probs."""
        self._require_scoring()

        async def one(target: str, ids: list[int], start: int) -> Score:
            _, lps, _ = await self._echoed(ids)
            return score_from_logprobs([float(x) for x in lps[start:] if x is not None], target)

        async def all_items() -> list[Score]:
            return list(await asyncio.gather(*(one(target, ids, start) for _, target, (ids, start) in items)))

        return self._run(all_items())

    def prompt_logprobs(self, ids: list[int], top_k: int) -> PromptLogprobs:
        self._require_scoring()
        if not ids:
            return PromptLogprobs([], [], [], [], [])
        tokens, lps, tops = self._run(self._echoed(ids, top_k))
        top = [t if top_k > 0 and t else None for t in tops]
        top[0] = None
        texts = [str(t) for t in tokens]
        return PromptLogprobs(texts, ids, text_offsets(texts), lps, top)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["engine"] = {
            "name": self.name,
            "url": self.public_url,
            "model": self.upstream_model,
            "available": self.down_reason is None,
            "unavailable_reason": self.down_reason,
            "scores_prompts": self.score_problem is None,
            "score_problem": self.score_problem,
        }
        return out
