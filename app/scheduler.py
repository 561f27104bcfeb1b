"""Bounded request queue and dynamic batching in front of the one engine.

A single worker thread owns the model, so generation never blocks the event
loop and the model is never called from two threads. Generation requests that
arrive within ``batch_wait_ms`` of each other are decoded together (up to
``max_batch_size``); scoring requests are batched likewise. A full queue is
refused at once (429) rather than letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.engine import Engine, GenerationJob, GenerationResult, ScoreItem
from app.metrics import Metrics
from app.scoring import Score

log = logging.getLogger("medask.scheduler")


class QueueFull(Exception):
    """The request queue is at capacity."""


@dataclass
class _Work:
    kind: str  # generate | score | call
    payload: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        batching: bool,
        max_batch_size: int,
        batch_wait_ms: float,
        queue_size: int,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch_size if batching else 1
        self.wait_s = batch_wait_ms / 1000 if batching else 0.0
        self._queue: queue.Queue[_Work] = queue.Queue(maxsize=queue_size)
        self._backlog: collections.deque[_Work] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medask-engine", daemon=True)
        self.continuous = batching and engine.continuous_batching
        self.batches = 0  # model batches run, for tests and /info
        self.admitted = 0  # requests that joined a batch already running
        self.running = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._backlog)

    # ---- submission (event loop side) -----------------------------------
    def _submit(self, kind: str, payload: Any, cancelled: threading.Event | None = None) -> _Work:
        loop = asyncio.get_running_loop()
        work = _Work(kind, payload, loop, loop.create_future())
        if cancelled is not None:
            work.cancelled = cancelled
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            self.metrics.queue_rejections.inc()
            raise QueueFull from None
        self.metrics.waiting.set(self.waiting)
        return work

    def generate(self, job: GenerationJob) -> asyncio.Future[GenerationResult]:
        return self._submit("generate", job, job.cancelled).future

    def score(self, items: list[ScoreItem]) -> asyncio.Future[list[Score]]:
        return self._submit("score", items).future

    def call(self, fn: Callable[[Engine], Any]) -> asyncio.Future[Any]:
        """Run ``fn(engine)`` on the worker thread, in turn with the batches."""
        return self._submit("call", fn).future

    # ---- worker thread ----------------------------------------------------
    def _next(self, timeout: float | None) -> _Work | None:
        if self._backlog:
            return self._backlog.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _collect(self, first: _Work) -> list[_Work]:
        batch = [first]
        if first.kind == "call":
            return batch
        deadline = time.perf_counter() + self.wait_s
        skipped: list[_Work] = []
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            work = self._next(remaining)
            if work is None:
                break
            if work.kind == first.kind:
                batch.append(work)
            else:
                skipped.append(work)
        self._backlog.extendleft(reversed(skipped))
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._next(0.1)
            if first is None:
                continue
            batch = [w for w in self._collect(first) if not self._drop_cancelled(w)]
            if not batch:
                continue
            self.running = len(batch)
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting)
            try:
                results = self._execute(batch)
            except Exception as exc:  # delivered to each caller, who maps it to a clear error
                log.exception("engine batch failed", extra={"event": "engine_error", "kind": batch[0].kind})
                for w in batch:
                    _deliver(w, exc=exc)
            else:
                for w, r in zip(batch, results, strict=True):
                    _deliver(w, result=r)
            finally:
                self.running = 0
                self.metrics.running.set(0)
                self.metrics.waiting.set(self.waiting)

    def _drop_cancelled(self, work: _Work) -> bool:
        if work.cancelled.is_set() or work.future.cancelled():
            # cancel, not an exception: nobody awaits it any more, and a never
            # retrieved exception would be logged as an error
            with contextlib.suppress(RuntimeError):
                work.loop.call_soon_threadsafe(work.future.cancel)
            return True
        return False

    def _execute(self, batch: list[_Work]) -> list[Any]:
        kind = batch[0].kind
        self.batches += 1
        self.metrics.batch_size.observe(len(batch))
        if kind == "generate":
            return self._generate(batch)
        if kind == "score":
            flat = [item for w in batch for item in w.payload]
            scores = self.engine.score(flat)
            out, i = [], 0
            for w in batch:
                out.append(scores[i : i + len(w.payload)])
                i += len(w.payload)
            return out
        return [w.payload(self.engine) for w in batch]

    def _generate(self, batch: list[_Work]) -> list[Any]:
        """Decode ``batch``, admitting queued generations into it as rows finish.

        Each request is answered the moment its row ends. Admission stops at
        the first queued non-generation job, so scoring and calls are never
        starved by a stream of generations: the batch drains and they run.
        """
        works = {id(w.payload): w for w in batch}

        def admit(room: int) -> list[GenerationJob]:
            new: list[GenerationJob] = []
            while len(new) < room:
                work = self._next(None)
                if work is None:
                    break
                if work.kind != "generate":
                    self._backlog.appendleft(work)
                    break
                if self._drop_cancelled(work):
                    continue
                works[id(work.payload)] = work
                new.append(work.payload)
            if new:
                self.admitted += len(new)
                self.running += len(new)
                self.metrics.running.set(self.running)
                self.metrics.waiting.set(self.waiting)
            return new

        def finished(job: GenerationJob, result: GenerationResult) -> None:
            _deliver(works.pop(id(job)), result=result)
            self.running -= 1
            self.metrics.running.set(self.running)

        try:
            self.engine.generate(
                [w.payload for w in batch],
                admit=admit if self.continuous else None,
                on_finish=finished,
                max_rows=self.max_batch,
            )
        except Exception as exc:
            for work in works.values():  # admitted jobs are not in ``batch``: tell them too
                _deliver(work, exc=exc)
            raise
        # every row was answered by ``finished``; the caller's second delivery is a no-op
        return [None] * len(batch)


def _deliver(work: _Work, result: Any = None, exc: BaseException | None = None) -> None:
    def _set() -> None:
        if work.future.done():
            return
        if exc is not None:
            work.future.set_exception(exc)
        else:
            work.future.set_result(result)

    # a closed loop (shutdown) means nobody is waiting
    with contextlib.suppress(RuntimeError):
        work.loop.call_soon_threadsafe(_set)
