"""Scoring against an upstream that is slow or failing (issue 26, items 3, 4 and 8): a dripping scoring
call holds neither the worker nor other keys and is cancelled at its deadline; connections are bounded;
one item's failure is that request's alone; upstream output is parsed off the loop all calls share.
MedAsk's scheduler and upstream engine against a fake OpenAI server on loopback (the tiny CI model's
tokenizer)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from app.engine import upstream as upstream_module
from app.engine.base import GenerationJob, SamplingParams
from app.engine.scheduler import Scheduler
from app.engine.upstream import UpstreamEngine, UpstreamError
from app.metrics import Metrics
from benchmarks.common import free_port

DRIP, FAIL, SLOW = 99991, 99997, 99995  # a prompt holding one of these ids: drip forever, fail, answer after 0.2 s


class Fake:
    def __init__(self) -> None:
        self.open = 0
        self.peak = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.open += 1
            self.peak = max(self.peak, self.open)

    def leave(self) -> None:
        with self.lock:
            self.open -= 1


def _echo(ids: list[int]) -> dict:
    n = len(ids)
    block = {
        "tokens": [f"t{i}" for i in ids],
        "token_logprobs": [None] + [-1.0] * (n - 1),
        "top_logprobs": [None] + [{f"t{i}": -1.0} for i in ids[1:]],
    }
    return {"choices": [{"text": "", "finish_reason": "length", "logprobs": block}]}


def make_app(fake: Fake) -> Starlette:
    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def completions(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        ids = list(body["prompt"])
        fake.enter()
        if body.get("echo") and DRIP in ids:

            async def drip() -> AsyncIterator[bytes]:
                try:
                    yield b'{"choices": ['
                    while not await request.is_disconnected():
                        await asyncio.sleep(0.2)
                        yield b" "
                finally:
                    fake.leave()

            return StreamingResponse(drip(), media_type="application/json")
        try:
            if FAIL in ids:
                return JSONResponse({"error": {"message": "no"}}, status_code=500)
            if SLOW in ids:
                await asyncio.sleep(0.2)
            if body.get("echo"):
                return JSONResponse(_echo(ids))
            text = " fine." if not body.get("stream") else None
            if text is not None:
                lp = {"tokens": [" fine", "."], "token_logprobs": [-0.5, -0.1], "top_logprobs": [None, None]}
                return JSONResponse({"choices": [{"text": text, "finish_reason": "stop", "logprobs": lp}]})
        finally:
            if not (body.get("echo") and DRIP in ids):
                fake.leave()

        async def stream() -> AsyncIterator[bytes]:
            for piece in (" fine", "."):
                lp = {"tokens": [piece], "token_logprobs": [-0.5], "top_logprobs": [None]}
                chunk = {"choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": lp}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, Fake]]:
    state = Fake()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def engine(ci_checkpoint: Path, fake: tuple[str, Fake]) -> Iterator[UpstreamEngine]:
    eng = UpstreamEngine.load(
        ci_checkpoint, Metrics(), url=fake[0], timeout_s=30, probe_s=60, max_connections=4, total_s=20
    )
    assert eng.score_problem is None, eng.score_problem
    yield eng
    eng.close()


def scheduler(engine: UpstreamEngine) -> Scheduler:
    s = Scheduler(engine, Metrics(), batching=True, max_batch_size=4, batch_wait_ms=100, queue_size=256, key_share=1.0)
    s.start()
    return s


def item(*ids: int) -> tuple[None, str, tuple[list[int], int]]:
    return (None, "x", ([1, 2, *ids, 3], 1))


def test_a_dripping_scoring_call_holds_up_no_one_and_ends_at_its_deadline(
    engine: UpstreamEngine, fake: tuple[str, Fake]
) -> None:
    sched = scheduler(engine)

    async def main() -> None:
        cancelled = threading.Event()
        slow = sched.score([item(DRIP)], key="a", deadline=time.monotonic() + 3, cancelled=cancelled)
        await asyncio.sleep(0.3)  # the drip has begun
        answer = sched.generate(GenerationJob([1, 2, 3], SamplingParams(max_new_tokens=4)), key="b")
        result = await asyncio.wait_for(answer, 15)
        assert result.text == " fine." and not slow.done()  # another key was answered while the drip went on
        with pytest.raises(UpstreamError):  # cancelled once no one waits for it (its deadline passed)
            await asyncio.wait_for(slow, 10)
        # the thread it held is free again: the next scoring request is answered
        scores = await asyncio.wait_for(sched.score([item(4)], key="a"), 10)
        assert scores[0].tokens == 3

    try:
        asyncio.run(main())
        deadline = time.time() + 5
        while fake[1].open and time.time() < deadline:  # the dripping connection was closed, not left open
            time.sleep(0.05)
        assert fake[1].open == 0
    finally:
        sched.stop()


def test_connections_to_the_upstream_are_bounded(engine: UpstreamEngine, fake: tuple[str, Fake]) -> None:
    fake[1].peak = 0
    items = [item(SLOW, 10 + i) for i in range(64)]
    scores = engine.score(items)
    assert len(scores) == 64 and all(not isinstance(s, BaseException) for s in scores)
    assert 1 < fake[1].peak <= 4  # MEDASK_UPSTREAM_MAX_CONNECTIONS, not 64


def test_one_items_failure_is_its_own_requests_alone(engine: UpstreamEngine) -> None:
    sched = scheduler(engine)

    async def main() -> None:
        bad = sched.score([item(4), item(FAIL)], key="a")
        good = sched.score([item(6), item(8)], key="b")  # the same batch (queued within batch_wait_ms)
        scores = await asyncio.wait_for(good, 10)
        assert [s.tokens for s in scores] == [3, 3]
        with pytest.raises(UpstreamError) as err:
            await asyncio.wait_for(bad, 10)
        assert err.value.status == 502

    try:
        asyncio.run(main())
        assert sched.batches >= 1
    finally:
        sched.stop()


def test_upstream_output_is_parsed_and_tokenized_off_the_shared_loop(
    engine: UpstreamEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    parse = upstream_module.sse_payloads

    def spy(line: str):
        seen.append(threading.current_thread().name)
        return parse(line)

    monkeypatch.setattr(upstream_module, "sse_payloads", spy)
    pieces: list[str] = []
    result = engine.generate([GenerationJob([1, 2, 3], SamplingParams(max_new_tokens=4), on_text=pieces.append)])[0]
    assert result.text == " fine." and pieces == [" fine", "."]
    assert seen and all(name.startswith("medask-upstream-cpu") for name in seen), set(seen)
