"""The worker-thread shell around the policy, with a fake engine: no model (fast)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from app.engine.base import GenerationJob, GenerationResult, SamplingParams
from app.engine.policy import DeadlineExceeded, QueueFull
from app.engine.scheduler import Scheduler
from app.metrics import Metrics


class FakeEngine:
    """Decodes one token per step for every row; a row ends after ``max_new_tokens`` steps."""

    continuous_batching = True
    concurrent_calls = False  # computes here, like the local engine (EngineBase's interface)

    def __init__(self, step_s: float = 0.002, fail: bool = False) -> None:
        self.step_s = step_s
        self.fail = fail
        self.threads: set[str] = set()
        self.batch_sizes: list[int] = []

    def generate(self, jobs, admit=None, on_finish=None, max_rows=None, on_error=None) -> list[GenerationResult]:
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("boom")
        rows = {id(j): [j, 0] for j in jobs}
        while rows:
            self.batch_sizes.append(len(rows))
            time.sleep(self.step_s)
            for key, (job, n) in list(rows.items()):
                rows[key][1] = n + 1
                if n + 1 >= job.params.max_new_tokens or job.cancelled.is_set():
                    del rows[key]
                    on_finish(job, GenerationResult("x" * (n + 1), [1] * (n + 1), [0.0] * (n + 1), "length", 1, 0.0))
            if admit is not None:
                for job in admit(max_rows - len(rows)):
                    rows[id(job)] = [job, 0]
        return []

    def score(self, items: list[Any], batch_size: int = 16, cancelled: Any = None) -> list[Any]:
        self.threads.add(threading.current_thread().name)
        return [len(i) for i in items]


def scheduler(engine: FakeEngine, **kw: Any) -> Scheduler:
    args: dict[str, Any] = {"batching": True, "max_batch_size": 4, "batch_wait_ms": 5, "queue_size": 16}
    args.update(kw)
    s = Scheduler(engine, Metrics(), **args)  # type: ignore[arg-type]
    s.start()
    return s


def job(tokens: int) -> GenerationJob:
    return GenerationJob([1, 2, 3], SamplingParams(max_new_tokens=tokens))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_every_request_is_answered_once_on_the_worker_thread() -> None:
    engine = FakeEngine()
    s = scheduler(engine)
    try:

        async def main() -> list[Any]:
            gens = await asyncio.gather(*(s.generate(job(n)) for n in (1, 5, 2, 9, 3, 4)))
            others = [s.score(["a", "bb"]), s.score(["ccc"]), s.call(lambda e: "called")]
            return [*gens, *await asyncio.gather(*others)]

        out = run(main())
        assert [len(r.text) for r in out[:6]] == [1, 5, 2, 9, 3, 4]
        assert out[6:] == [[1, 2], [3], "called"]
        assert engine.threads == {"medask-engine"}
        assert s.admitted >= 2  # 6 generations, 4 rows: later ones joined the running batch
        assert max(engine.batch_sizes) <= 4
        assert s.waiting == 0 and s.running == 0
    finally:
        s.stop()


def test_an_engine_failure_reaches_every_waiting_row() -> None:
    s = scheduler(FakeEngine(fail=True))
    try:

        async def main() -> list[Any]:
            return await asyncio.gather(*(s.generate(job(3)) for _ in range(3)), return_exceptions=True)

        assert all(isinstance(r, RuntimeError) for r in run(main()))
        deadline = time.monotonic() + 5
        while s.running and time.monotonic() < deadline:  # the worker's bookkeeping follows delivery
            time.sleep(0.01)
        assert s.running == 0
    finally:
        s.stop()


def test_expired_work_is_dropped_before_it_runs() -> None:
    engine = FakeEngine(step_s=0.02)
    s = scheduler(engine, max_batch_size=1, batching=False)
    try:

        async def main() -> list[Any]:
            long = s.generate(job(10))
            await asyncio.sleep(0.01)
            late = s.generate(job(1), deadline=time.monotonic() + 0.05)  # passes while `long` runs
            return await asyncio.gather(long, late, return_exceptions=True)

        long, late = run(main())
        assert len(long.text) == 10 and isinstance(late, DeadlineExceeded)
        assert s.dropped == 1 and engine.batch_sizes.count(1) == 10  # the late one never decoded
    finally:
        s.stop()


def test_queue_full_is_refused_at_submit() -> None:
    s = scheduler(FakeEngine(step_s=0.05), queue_size=2, max_batch_size=1)
    try:

        async def main() -> None:
            first = s.generate(job(5))
            await asyncio.sleep(0.02)  # running now
            queued = [s.generate(job(1)), s.generate(job(1))]
            with pytest.raises(QueueFull):
                s.generate(job(1))
            await asyncio.gather(first, *queued)

        run(main())
    finally:
        s.stop()


def test_work_expires_while_a_batch_runs_not_after_it() -> None:
    engine = FakeEngine(step_s=0.02)
    s = scheduler(engine, max_batch_size=2, batch_wait_ms=0)
    try:

        async def main() -> tuple[Any, bool]:
            longs = [s.generate(job(20)), s.generate(job(20))]  # both rows busy for 20 steps
            await asyncio.sleep(0.05)
            late = s.generate(job(1), deadline=time.monotonic() + 0.05)
            result = (await asyncio.gather(late, return_exceptions=True))[0]
            batch_still_running = not all(f.done() for f in longs)
            await asyncio.gather(*longs)
            return result, batch_still_running

        result, batch_still_running = run(main())
        assert isinstance(result, DeadlineExceeded)
        assert batch_still_running  # dropped between decode steps, not when the batch ended
        assert s.dropped == 1
    finally:
        s.stop()
