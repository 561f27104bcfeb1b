"""What runs next: the scheduling policy as a pure state machine (no threads, no model).

In the spirit of vLLM's scheduler, the policy only decides; the worker thread in
app.engine.scheduler is a thin shell that asks it what to run and delivers results.
Being pure, every rule below is tested without a model (tests/fast/engine/test_policy.py).

Rules:
- **Bounded queue**: a full queue refuses new work at once (429), and one API key
  may hold at most ``key_share`` of it (queued and running together), so one
  client's burst cannot lock every other client out.
- **Batches of one kind**: generations decode together, scoring requests score
  together, calls run alone. A batch forms when ``max_rows`` works of the oldest
  work's kind are waiting or the oldest has waited ``wait_s``; with ``join_running``
  (continuous batching) generations start at once: a later one joins the running
  batch at its next step, so waiting for company would only delay the first.
- **Fair order**: among waiting works of one kind, keys take turns (the key with
  the fewest rows running goes first, then the oldest work), FIFO within a key.
- **Admission by tokens**: a generation holds ``cost`` tokens of the batch
  (prompt + max new tokens: what its KV cache can grow to); the running rows may
  hold at most ``max_batch_tokens``. A work that does not fit is passed over for
  smaller ones behind it, so long generations cannot take every row from short
  ones; once it has waited ``max_skip_s`` nothing passes it any more.
- **Admission into a running batch** stops while any scoring request or call is
  waiting, so the batch drains and they run: no kind starves.
- **Deadlines**: cancelled work and work past its deadline leave the queue before
  they are computed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Kind(Enum):
    GENERATE = "generate"
    SCORE = "score"
    CALL = "call"


class QueueFull(Exception):
    """The queue (or this key's share of it) is at capacity."""

    def __init__(self, message: str = "the server is at capacity; retry shortly") -> None:
        super().__init__(message)
        self.message = message


class DeadlineExceeded(Exception):
    """The work's deadline passed before it could run: dropped, never computed."""


@dataclass(eq=False)
class Work:
    """One request's unit of work, as the policy sees it."""

    kind: Kind
    payload: Any
    key: str | None = None  # the API key id (None: no auth), for fair shares
    cost: int = 1  # tokens a generation may hold in the batch
    deadline: float = math.inf  # monotonic time after which nobody waits for it
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by the shell: how the result reaches the waiting request
    handle: Any = None


class Policy:
    def __init__(
        self,
        *,
        max_rows: int,
        wait_s: float,
        queue_size: int,
        key_share: float = 1.0,
        max_batch_tokens: int | None = None,
        max_skip_s: float = 30.0,
        join_running: bool = False,
    ) -> None:
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.join_running = join_running
        self.queue_size = queue_size
        self.key_limit = max(1, math.floor(queue_size * key_share))
        self.max_batch_tokens = max_batch_tokens
        self.max_skip_s = max_skip_s
        self.waiting: list[Work] = []  # in arrival order
        self.running: list[Work] = []  # generation rows in the running batch
        self._held: Counter[str | None] = Counter()  # works per key, waiting or running

    # ---- submission ------------------------------------------------------------
    def submit(self, work: Work) -> None:
        if len(self.waiting) >= self.queue_size:
            raise QueueFull()
        if work.key is not None and self._held[work.key] >= self.key_limit:
            raise QueueFull(
                f"this caller (API key, or address without keys) already holds {self._held[work.key]} requests, "
                "its share of the queue; retry shortly"
            )
        self.waiting.append(work)
        self._held[work.key] += 1

    # ---- housekeeping ----------------------------------------------------------
    def expire(self, now: float) -> list[Work]:
        """Remove (and return) waiting works that were cancelled or whose deadline passed."""
        gone = [w for w in self.waiting if w.cancelled.is_set() or now >= w.deadline]
        for w in gone:
            self._remove(w)
        return gone

    def finished(self, work: Work) -> None:
        """A running generation row ended (or a batch of scoring/calls was answered)."""
        if work in self.running:
            self.running.remove(work)
        self._held[work.key] -= 1
        if self._held[work.key] <= 0:
            del self._held[work.key]

    # ---- decisions -------------------------------------------------------------
    def take(self, now: float) -> list[Work] | float | None:
        """The next batch to run on an idle worker; or how long to wait for company; or None (idle)."""
        if not self.waiting:
            return None
        head = self.waiting[0]
        if head.kind is Kind.CALL:
            self._remove(head, keep_held=True)  # held until finished(), like every batch
            return [head]
        same = [w for w in self.waiting if w.kind is head.kind]
        alone_waits = not (self.join_running and head.kind is Kind.GENERATE)
        if alone_waits and len(same) < self.max_rows and now - head.enqueued < self.wait_s:
            return self.wait_s - (now - head.enqueued)
        chosen = self._choose(same, self.max_rows, now) if head.kind is Kind.GENERATE else same[: self.max_rows]
        if not chosen:
            return self.wait_s or 0.01
        for w in chosen:
            self._remove(w, keep_held=True)
        if head.kind is Kind.GENERATE:
            self.running.extend(chosen)
        return chosen

    def admit(self, now: float) -> list[Work]:
        """Generations that join the running batch now (continuous batching)."""
        if any(w.kind is not Kind.GENERATE for w in self.waiting):
            return []  # let the batch drain: scoring and calls are next
        room = self.max_rows - len(self.running)
        if room <= 0:
            return []
        chosen = self._choose([w for w in self.waiting if w.kind is Kind.GENERATE], room, now)
        for w in chosen:
            self._remove(w, keep_held=True)
        self.running.extend(chosen)
        return chosen

    def _choose(self, candidates: list[Work], room: int, now: float) -> list[Work]:
        """Up to ``room`` generations in fair order that fit the token budget."""
        budget = math.inf if self.max_batch_tokens is None else self.max_batch_tokens - self.tokens_running
        rows = Counter(w.key for w in self.running)
        queues: dict[str | None, list[Work]] = {}
        for w in candidates:  # arrival order within each key
            queues.setdefault(w.key, []).append(w)
        starving = [w for w in candidates if w.cost > budget and now - w.enqueued >= self.max_skip_s]
        if starving:  # passed over long enough: nothing more goes ahead of it; it runs once the batch drains
            return [] if self.running else [starving[0]]
        chosen: list[Work] = []
        while len(chosen) < room and queues:
            # the key with the fewest rows running (chosen ones count), then the oldest head
            key = min(queues, key=lambda k: (rows[k], queues[k][0].enqueued))
            queue = queues[key]
            # its oldest work that fits; a smaller one behind a long one may go first
            pick = next((i for i, w in enumerate(queue) if w.cost <= budget or (not self.running and not chosen)), None)
            if pick is None:
                del queues[key]
                continue
            work = queue.pop(pick)
            chosen.append(work)
            budget -= work.cost
            rows[key] += 1
            if not queue:
                del queues[key]
        return chosen

    # ---- state -----------------------------------------------------------------
    @property
    def tokens_running(self) -> int:
        return sum(w.cost for w in self.running)

    def _remove(self, work: Work, keep_held: bool = False) -> None:
        self.waiting.remove(work)
        if not keep_held:
            self._held[work.key] -= 1
            if self._held[work.key] <= 0:
                del self._held[work.key]
