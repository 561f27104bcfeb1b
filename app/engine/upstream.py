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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.clinical.scoring import Score, score_from_logprobs
from app.engine.base import (
    GenerationJob,
    GenerationResult,
    PromptLogprobs,
    ScoreItem,
    open_checkpoint,
    text_offsets,
)
from app.engine.upstream_link import POLL_S, UpstreamLink
from app.engine.upstream_protocol import (
    UpstreamError,
    bounded_lines,
    finish_of,
    response_cap,
    split_logprobs,
    sse_payloads,
)
from app.metrics import Metrics


class UpstreamEngine(UpstreamLink):
    """Generation, scoring and prompt log-probabilities computed upstream, on ``UpstreamLink``."""

    # scoring and calls wait on the network, not on this process's CPU: the scheduler runs them beside
    # generation, on threads of their own, so a slow upstream never holds the worker (and every key) up
    concurrent_calls = True

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
        pieces_left = job.params.max_new_tokens  # an upstream that ignores max_tokens is cut off here
        try:
            async with asyncio.timeout(self.total_s):  # the whole stream, however slowly it drips
                return await self._read_stream(job, body, pieces_left)
        except TimeoutError:
            raise self._too_long() from None

    async def _read_stream(
        self, job: GenerationJob, body: dict[str, Any], pieces_left: int
    ) -> tuple[str, Any, dict[str, Any] | None, int | None, float | None]:
        assert job.on_text is not None
        text, finish, usage, first_at = "", None, None, None
        tokens: list[str] = []
        lps: list[Any] = []
        tops: list[Any] = []
        complete_logprobs = True
        async with self._completion(body, "stream") as r:
            async for line in bounded_lines(r, response_cap(job.params.max_new_tokens)):
                obj = await self._offload(sse_payloads, line)
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
        answer_ids = await self._offload(self._encode_off_loop, text)
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

    def score(
        self, items: Sequence[ScoreItem], batch_size: int = 16, cancelled: Callable[[], bool] | None = None
    ) -> list[Score | BaseException]:
        """log p(target | context) per item, from the upstream's echoed prompt log-probs. One item's
        failure is that item's (its request fails, the others in the batch do not); ``cancelled``
        stops the whole call when no one is waiting for it any more."""
        self._require_scoring()

        async def one(target: str, ids: list[int], start: int) -> Score:
            _, lps, _ = await self._echoed(ids)
            return score_from_logprobs([float(x) for x in lps[start:] if x is not None], target)

        async def all_items() -> list[Score | BaseException]:
            calls = (one(target, ids, start) for _, target, (ids, start) in items)
            return list(await asyncio.gather(*calls, return_exceptions=True))

        return self._run(all_items(), cancelled=cancelled)

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
