"""An unhandled error (issue 26, item 14) under the real server: answered 500 in the error shape, logged
once with its traceback, and the client's keep-alive connection survives it; one access line per request
(uvicorn's own access log stays off, however the app is started). No model: the checkpoint folder is
missing on purpose, so nothing loads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings
from benchmarks.common import free_port


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[str, Records]]:
    app = create_app(Settings(model_dir=tmp_path / "none", exit_on_load_failure=False))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # access log on
    records = Records()
    for name in ("medask", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addHandler(records)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", records
    server.should_exit = True
    thread.join(5)
    for name in ("medask", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).removeHandler(records)


def test_an_unhandled_error_is_answered_logged_once_and_keeps_the_connection(served: tuple[str, Records]) -> None:
    base, records = served
    with httpx.Client(base_url=base) as client:
        r = client.get("/boom")
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error" and r.headers["x-request-id"]
        again = client.get("/health")
        assert again.status_code == 200
        pool = client._transport._pool  # one connection served both: it was not reset after the 500
        assert len(pool.connections) == 1
    time.sleep(0.2)
    tracebacks = [r for r in records.records if r.exc_info]
    assert len(tracebacks) == 1 and "a bug" in str(tracebacks[0].exc_info[1])
    access = [r for r in records.records if r.name in ("medask.access", "uvicorn.access")]
    assert len(access) == 2 and {r.name for r in access} == {"medask.access"}
