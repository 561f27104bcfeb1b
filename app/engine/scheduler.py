"""The worker thread in front of the one engine: a thin shell around app.engine.policy.

A single worker thread owns the model (and the engine's tokenizer), so generation
never blocks the event loop and the model is never called from two threads. The
policy decides what runs next; this module only waits, runs what it is given,
and delivers each result, from one place (``_deliver``), to the request awaiting it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from app.clinical.scoring import Score
from app.engine.base import EngineBase, EngineError, GenerationJob, GenerationResult, ScoreItem
from app.engine.policy import DeadlineExceeded, Kind, Policy, QueueFull, Work
from app.metrics import Metrics

__all__ = ["QueueFull", "Scheduler"]

BESIDE_THREADS = 4  # scoring requests and calls in flight at once to an upstream engine
log = logging.getLogger("medask.scheduler")


class _Handle:
    """Where a work's result goes: a future on the event loop that submitted it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()


class Scheduler:
    def __init__(
        self,
        engine: EngineBase,
        metrics: Metrics,
        *,
        batching: bool,
        max_batch_size: int,
        batch_wait_ms: float,
        queue_size: int,
        key_share: float = 1.0,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch_size if batching else 1
        self.continuous = batching and engine.continuous_batching
        self.policy = Policy(
            max_rows=self.max_batch,
            wait_s=batch_wait_ms / 1000 if batching else 0.0,
            queue_size=queue_size,
            key_share=key_share,
            max_batch_tokens=max_batch_tokens,
            join_running=self.continuous,
        )
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medask-engine", daemon=True)
        self.batches = 0  # model batches run, for tests and /info
        self.admitted = 0  # requests that joined a batch already running
        self.dropped = 0  # works that left the queue cancelled or past their deadline, never computed
        # an engine whose scoring and calls wait on the network (upstream) answers them here, beside
        # generation: a slow upstream call holds one of these threads, never the worker and every key
        self._beside = (
            concurrent.futures.ThreadPoolExecutor(max_workers=BESIDE_THREADS, thread_name_prefix="medask-calls")
            if engine.concurrent_calls
            else None
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if self._beside is not None:
            self._beside.shutdown(wait=False, cancel_futures=True)

    @property
    def waiting(self) -> int:
        return len(self.policy.waiting)

    @property
    def running(self) -> int:
        return len(self.policy.running)

    # ---- submission (event loop side) -------------------------------------------
    def info(self) -> dict[str, Any]:
        """What /info reports of the scheduler and its policy."""
        return {
            "max_batch_size": self.max_batch,
            "continuous_batching": self.continuous,
            "batches_run": self.batches,
            "admitted_into_running_batches": self.admitted,
            # left the queue unrun: past their deadline, or their client had gone
            "dropped_unrun": self.dropped,
            "max_batch_tokens": self.policy.max_batch_tokens,
            "key_queue_limit": self.policy.key_limit,
        }

    def _submit(
        self,
        kind: Kind,
        payload: Any,
        *,
        key: str | None = None,
        cost: int = 1,
        deadline: float = math.inf,
        cancelled: threading.Event | None = None,
    ) -> asyncio.Future:
        handle = _Handle(asyncio.get_running_loop())
        work = Work(kind, payload, key=key, cost=cost, deadline=deadline, handle=handle)
        if cancelled is not None:
            work.cancelled = cancelled
        with self._cond:
            try:
                self.policy.submit(work)
            except QueueFull:
                self.metrics.queue_rejections.inc()
                raise
            self._gauges()
            self._cond.notify()
        return handle.future

    def generate(
        self, job: GenerationJob, key: str | None = None, deadline: float = math.inf
    ) -> asyncio.Future[GenerationResult]:
        cost = len(job.prompt_ids) + job.params.max_new_tokens
        return self._submit(Kind.GENERATE, job, key=key, cost=cost, deadline=deadline, cancelled=job.cancelled)

    def score(
        self,
        items: list[ScoreItem],
        key: str | None = None,
        deadline: float = math.inf,
        cancelled: threading.Event | None = None,
    ) -> asyncio.Future[list[Score]]:
        return self._submit(Kind.SCORE, items, key=key, deadline=deadline, cancelled=cancelled)

    def call(
        self,
        fn: Callable[[EngineBase], Any],
        key: str | None = None,
        deadline: float = math.inf,
        cancelled: threading.Event | None = None,
    ) -> asyncio.Future[Any]:
        """Run ``fn(engine)`` on the worker thread, in turn with the batches."""
        return self._submit(Kind.CALL, fn, key=key, deadline=deadline, cancelled=cancelled)

    # ---- worker thread --------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._expire()
                batch = self.policy.take(time.monotonic())
                if not isinstance(batch, list):
                    self._cond.wait(0.1 if batch is None else batch)
                    continue
                self._gauges()
            if batch[0].kind is not Kind.GENERATE and self._beside is not None:
                self.batches += 1
                self._beside.submit(self._answer_beside, batch)
                continue
            try:
                self._execute(batch)
            except Exception as exc:  # delivered to each caller, who maps it to a clear error
                _failed(batch, exc)
            finally:
                with self._cond:
                    for work in list(self.policy.running) if batch[0].kind is Kind.GENERATE else batch:
                        self.policy.finished(work)
                    self._gauges()

    def _execute(self, batch: list[Work]) -> None:
        self.batches += 1
        self.metrics.batch_size.observe(len(batch))
        if batch[0].kind is Kind.GENERATE:
            self._generate(batch)
        else:
            self._answer(batch)

    def _answer(self, batch: list[Work]) -> None:
        """A batch of scoring requests, or a call. One item's failure fails only its own request."""
        if batch[0].kind is Kind.CALL:
            for work in batch:
                _deliver(work, result=work.payload(self.engine))
            return
        scores = self.engine.score([item for w in batch for item in w.payload], cancelled=lambda: _abandoned(batch))
        i = 0
        for work in batch:
            part = scores[i : i + len(work.payload)]
            i += len(work.payload)
            failed = next((s for s in part if isinstance(s, BaseException)), None)
            if failed is not None:
                _failed([work], failed)
            else:
                _deliver(work, result=part)

    def _answer_beside(self, batch: list[Work]) -> None:
        """``_answer`` on a thread of its own; the batch leaves the policy when it is answered."""
        try:
            self.metrics.batch_size.observe(len(batch))
            self._answer(batch)
        except Exception as exc:
            _failed(batch, exc)
        finally:
            with self._cond:
                for work in batch:
                    self.policy.finished(work)
                self._gauges()
                self._cond.notify()

    def _generate(self, batch: list[Work]) -> None:
        """Decode ``batch``; the policy admits queued generations into it as rows finish, and each
        request is answered the moment its row ends."""
        works = {id(w.payload): w for w in batch}

        def admit(room: int) -> list[GenerationJob]:
            with self._cond:
                self._expire()  # between decode steps too: nothing past its deadline joins the batch
                new = self.policy.admit(time.monotonic())  # the policy counts the rows itself
                if new:
                    self.admitted += len(new)
                    self._gauges()
            works.update({id(w.payload): w for w in new})
            return [w.payload for w in new]

        def ended(job: GenerationJob, result: GenerationResult | None = None, exc: BaseException | None = None) -> None:
            """A row finished (or, with an upstream engine, failed alone): its work leaves the batch."""
            work = works.pop(id(job))
            with self._cond:
                self.policy.finished(work)
                self._gauges()
            _deliver(work, result=result, exc=exc)

        try:
            self.engine.generate(
                [w.payload for w in batch],
                admit=admit if self.continuous else None,
                on_finish=ended,
                max_rows=self.max_batch,
                on_error=lambda job, exc: ended(job, exc=exc),
            )
        except Exception as exc:
            for work in works.values():  # admitted rows are not in ``batch``: tell them too
                _deliver(work, exc=exc)
            raise

    def _expire(self) -> None:
        """Drop waiting work that was cancelled or is past its deadline (call with the lock held)."""
        for work in self.policy.expire(time.monotonic()):
            self.dropped += 1
            # a client that left: cancelled; a deadline that passed: the waiter answers 504
            _deliver(work, cancel=work.cancelled.is_set(), exc=DeadlineExceeded())

    def _gauges(self) -> None:
        self.metrics.waiting.set(len(self.policy.waiting))
        self.metrics.running.set(len(self.policy.running))


def _abandoned(batch: list[Work]) -> bool:
    """No one waits for this batch any more: every request left, or is past its deadline."""
    now = time.monotonic()
    return all(w.cancelled.is_set() or now > w.deadline for w in batch)


def _failed(batch: list[Work], exc: BaseException) -> None:
    """Each request of a failed batch hears why (it maps the failure to a clear error)."""
    if isinstance(exc, EngineError):  # explained to the client; no traceback needed
        log.warning(exc.message, extra={"event": "engine_error", "kind": batch[0].kind.value})
    else:
        log.error(
            "engine batch failed",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"event": "engine_error", "kind": batch[0].kind.value},
        )
    for work in batch:
        _deliver(work, exc=exc)


def _deliver(work: Work, result: Any = None, exc: BaseException | None = None, cancel: bool = False) -> None:
    """The one place a result, an error or a cancellation reaches the request awaiting ``work``."""
    handle: _Handle = work.handle

    def _set() -> None:
        fut = handle.future
        if fut.done():
            return
        if cancel:
            # cancel, not an exception: nobody awaits it any more, and a never-retrieved
            # exception would be logged as an error
            fut.cancel()
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    # a closed loop (shutdown) means nobody is waiting
    with contextlib.suppress(RuntimeError):
        handle.loop.call_soon_threadsafe(_set)
