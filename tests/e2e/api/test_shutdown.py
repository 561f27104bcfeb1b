"""Graceful shutdown: SIGTERM with plain and streamed requests in flight."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server


def _load(srv: Server, plain: int, max_new: int) -> tuple[dict, threading.Event, list[threading.Thread]]:
    results: dict = {}
    started = threading.Event()

    def ask(i: int) -> None:
        try:
            r = httpx.post(
                f"{srv.base}/ask", json={"question": "Cough in a smoker?", "max_new_tokens": max_new}, timeout=120
            )
            results[i] = (r.status_code, r.json())
        except httpx.HTTPError as exc:
            results[i] = ("failed", repr(exc))

    def stream() -> None:
        events = []
        try:
            body = {"question": "Cough in a smoker?", "max_new_tokens": max_new, "stream": True}
            with httpx.stream("POST", f"{srv.base}/ask", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        events.append(line[7:])
                        started.set()
                    elif line.startswith("data: "):
                        events.append(json.loads(line[6:]))
        except httpx.HTTPError as exc:
            events.append(("failed", repr(exc)))
        results["stream"] = events

    threads = [threading.Thread(target=stream)] + [threading.Thread(target=ask, args=(i,)) for i in range(plain)]
    for t in threads:
        t.start()
    return results, started, threads


def _wait_inflight(srv: Server, n: int) -> None:
    import time

    for _ in range(600):
        text = httpx.get(f"{srv.base}/metrics").text
        value = next(
            float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("medask_http_requests_inflight ")
        )
        if value >= n + 1:  # this scrape counts too
            return
        time.sleep(0.05)
    raise AssertionError("the requests never reached the server")


@pytest.mark.parametrize("drain_s", ["60", "0.2"])
def test_sigterm_drains_in_flight_work_then_exits_zero(ci_checkpoint: Path, tmp_path: Path, drain_s: str) -> None:
    srv = start_server(ci_checkpoint, tmp_path / "s.log", MEDASK_BATCHING="false", MEDASK_DRAIN_S=drain_s)
    try:
        results, started, threads = _load(srv, plain=3, max_new=200 if drain_s == "60" else 400)
        assert started.wait(60)  # the stream has begun
        _wait_inflight(srv, 4)  # and all four requests are in the server
        srv.proc.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{srv.base}/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        late = httpx.post(f"{srv.base}/ask", json={"question": "Cough?"})
        assert late.status_code == 503 and late.json()["error"]["type"] == "shutting_down"
        assert late.headers["retry-after"]
        for t in threads:
            t.join(120)
        assert srv.proc.wait(30) == 0
    finally:
        stop_server(srv)
    plain = [results[i] for i in range(3)]
    stream = results["stream"]
    if drain_s == "60":  # long enough: everything in flight finishes normally
        assert all(status == 200 and body["finish_reason"] in ("stop", "length") for status, body in plain), plain
        assert stream[-2] == "summary" and stream[-1]["usage"]["completion_tokens"] > 0
    else:  # cut short: every request still gets a clear ending, never a dropped connection
        for status, body in plain:
            assert status == 200 or (status == 503 and body["error"]["type"] == "shutting_down"), (status, body)
        assert stream[-2] in ("summary", "error"), stream[-4:]
        if stream[-2] == "error":
            assert stream[-1]["error"]["type"] == "shutting_down"
    log = (tmp_path / "s.log").read_text()
    assert '"event": "draining"' in log and "Traceback" not in log.split('"event": "draining"')[1]
