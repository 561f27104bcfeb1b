"""An upstream that misbehaves (issue 26): it ignores max_tokens, streams without end, sends an endless
line or a huge error page echoing our key. MedAsk's upstream engine against a fake OpenAI server on
loopback (Starlette under uvicorn in a thread); the checkpoint's text side is the tiny CI model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from app.engine.base import GenerationJob, SamplingParams
from app.engine.upstream import UpstreamEngine, UpstreamError
from app.metrics import Metrics
from benchmarks.common import free_port

KEY = "sk-upstream-secret-42"


async def models(_: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})


async def completions(request: Request) -> StreamingResponse | JSONResponse | PlainTextResponse:
    body = await request.json()
    mode = request.app.state.mode
    if mode == "error-page":  # a huge error that echoes the request's headers (and so our key)
        echo = json.dumps(dict(request.headers)) + "x" * 8_000_000
        return PlainTextResponse(echo, status_code=500)
    if body.get("echo"):  # the scoring probe: an echo without log-probs (cannot score)
        return JSONResponse({"choices": [{"text": "", "finish_reason": "length", "logprobs": None}]})

    async def endless() -> AsyncIterator[bytes]:
        if mode == "endless-line":
            while not await request.is_disconnected():
                yield b"data: " + b"a" * 65536
            return
        n = 0
        while not await request.is_disconnected():  # ignores max_tokens, until the client leaves
            n += 1
            chunk = {"choices": [{"index": 0, "text": f" w{n}", "finish_reason": None, "logprobs": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()

    return StreamingResponse(endless(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, Starlette]]:
    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])
    app.state.mode = "ignores-max-tokens"
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://user:pw-in-url@127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(5)


@pytest.fixture(scope="module")
def engine(ci_checkpoint: Path, fake: tuple[str, Starlette]) -> Iterator[UpstreamEngine]:
    eng = UpstreamEngine.load(ci_checkpoint, Metrics(), url=fake[0], api_key=KEY, timeout_s=10, probe_s=60)
    yield eng
    eng.close()


def job(n: int) -> GenerationJob:
    return GenerationJob([1, 2, 3], SamplingParams(max_new_tokens=n), on_text=lambda _: None)


def test_output_is_cut_at_max_tokens(engine: UpstreamEngine, fake: tuple[str, Starlette]) -> None:
    fake[1].state.mode = "ignores-max-tokens"
    sent: list[str] = []
    j = GenerationJob([1, 2, 3], SamplingParams(max_new_tokens=8), on_text=sent.append)
    result = engine.generate([j])[0]
    assert len(sent) == 8 and result.finish_reason == "length" and result.text.count(" w") == 8


def test_an_endless_line_is_cut_off_not_buffered(engine: UpstreamEngine, fake: tuple[str, Starlette]) -> None:
    fake[1].state.mode = "endless-line"
    t0 = time.monotonic()
    with pytest.raises(UpstreamError) as err:
        engine.generate([job(4)])
    assert err.value.status == 502 and time.monotonic() - t0 < 10


def test_an_error_page_is_a_fixed_message_without_our_key(engine: UpstreamEngine, fake: tuple[str, Starlette]) -> None:
    fake[1].state.mode = "error-page"
    with pytest.raises(UpstreamError) as err:
        engine.generate([job(4)])
    assert err.value.status == 502 and KEY not in err.value.message and len(err.value.message) < 200
    # the URL's credentials are shown nowhere
    info = json.dumps(engine.info())
    assert "pw-in-url" not in info and "pw-in-url" not in (engine.down_reason or "")
    metrics = engine.metrics.registry.get_sample_value("medask_upstream_up", {"url": engine.public_url})
    assert metrics is not None and "pw-in-url" not in engine.public_url
