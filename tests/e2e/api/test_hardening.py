"""Defects an outside probe found (auth misconfiguration, browsers, probes, redirects, bad
Unicode, chunked bodies), each reproduced against the live server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEYS, ROOT, Server, start_server, stop_server

ALLOWED_ORIGIN = "https://clinic.example"


def test_a_keys_setting_without_a_key_is_a_startup_error(ci_checkpoint: Path) -> None:
    import os

    env = {**os.environ, "MEDASK_API_KEYS": " , ", "MEDASK_MODEL_DIR": str(ci_checkpoint)}
    proc = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "MEDASK_API_KEYS" in proc.stderr and "holds no key" in proc.stderr


def test_cors_preflight_is_answered_before_auth(server: Server) -> None:
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(f"{server.base}/ask", headers={"Origin": ALLOWED_ORIGIN, **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    bad = httpx.options(f"{server.base}/ask", headers={"Origin": "https://evil.example", **pre})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    # an actual cross-origin call without a key is still refused, with CORS headers so the browser can read why
    r = httpx.post(f"{server.base}/ask", json={"question": "x"}, headers={"Origin": ALLOWED_ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_docs_need_a_key_when_keys_are_set(server: Server) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{server.base}{path}").status_code == 401
        assert httpx.get(f"{server.base}{path}", headers=server.headers()).status_code == 200


def test_docs_can_be_made_public(ci_checkpoint: Path, tmp_path: Path) -> None:
    srv = start_server(ci_checkpoint, tmp_path / "s.log", MEDASK_API_KEYS=API_KEYS[0], MEDASK_DOCS_PUBLIC="true")
    try:
        assert httpx.get(f"{srv.base}/openapi.json").status_code == 200
        assert httpx.get(f"{srv.base}/info").status_code == 401
    finally:
        stop_server(srv)


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_answer_head(server: Server, path: str) -> None:
    r = httpx.head(f"{server.base}{path}")
    assert r.status_code == 200 and r.content == b""


def test_no_redirect_on_api_routes(server: Server) -> None:
    r = httpx.post(
        f"{server.base}/ask/", json={"question": "x"}, headers={**server.headers(), "Host": "attacker.example"}
    )
    assert r.status_code in (404, 405) and "location" not in r.headers


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/ask", b'{"question": "\\ud800 chest pain"}'),
        ("/perplexity", b'{"text": "a \\udfff b"}'),
        ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 1}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ],
)
def test_a_lone_surrogate_is_a_422_not_a_500(server: Server, path: str, body: bytes) -> None:
    r = httpx.post(
        f"{server.base}{path}", content=body, headers={**server.headers(), "Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert "surrogate" in r.json()["error"]["message"]
    assert "Traceback" not in server.log_text()


def test_an_over_limit_chunked_body_is_a_413(server: Server) -> None:
    def chunks():
        for _ in range(40):
            yield b" " * 4096  # 160 KB in all, over the server's 64 KB limit, with no Content-Length

    r = httpx.post(
        f"{server.base}/ask", content=chunks(), headers={**server.headers(), "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    # and a small chunked body still works
    ok = httpx.post(
        f"{server.base}/perplexity",
        content=iter([b'{"text": ', b'"Hypertension is common."}']),
        headers={**server.headers(), "Content-Type": "application/json"},
    )
    assert ok.status_code == 200, ok.text


def test_every_log_record_is_one_json_line(server: Server) -> None:
    """After the model loads a library adds a root handler; no record may reach it too."""
    import json

    rid = "log-check-7"
    httpx.get(f"{server.base}/info", headers={**server.headers(), "X-Request-ID": rid})
    lines = server.log_text().splitlines()
    plain = [
        ln for ln in lines if ln.startswith(("INFO:", "WARNING:", "ERROR:")) and ("medask" in ln or "uvicorn" in ln)
    ]
    assert plain == []
    records = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert sum(r.get("request_id") == rid for r in records) == 1
    assert any(r["logger"] == "medask.serving" and r.get("event") == "ready" for r in records)
