"""The store as the service uses it: every write on one thread of its own, in the order the requests came
(an answer is recorded before feedback on it can be, and SQLite has one writer), reads on others; never the
event loop, never the decode worker. A store that fails to record an answer never fails the answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from app.feedback.store import Answered, Store
from app.metrics import Metrics

log = logging.getLogger("medask.feedback")
T = TypeVar("T")


class FeedbackService:
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store, self.metrics = store, metrics
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medask-store")

    def record(self, answered: Answered) -> None:
        """Queue an answer's record (returns at once; the writer keeps the order)."""
        fut = self._writer.submit(self.store.record_answer, answered)
        fut.add_done_callback(self._logged)

    def _logged(self, fut: concurrent.futures.Future) -> None:
        exc = fut.exception()
        if exc is not None:
            self.metrics.feedback_store_errors.inc()
            log.warning(
                "the feedback store could not record an answer",
                extra={"event": "store_error", "exc_type": type(exc).__name__},
            )

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def export(self) -> Iterator[dict[str, Any]]:
        return self.store.export()

    def info(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "backend": self.store.backend,
            "store_text": self.store.store_text,
            "retention_days": self.store.retention.days,
        }

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.store.close()
