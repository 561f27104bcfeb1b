"""MEDASK_ENGINE=upstream end to end: a MedAsk in front of a real OpenAI-compatible server on
loopback. The upstream is a second MedAsk in local mode (it implements echo + logprobs as
vLLM does), so both modes can be compared answer for answer on the tiny model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port, start_server, stop_server
from tests.fast.test_deploy import UPSTREAM_METRICS, alert_exprs, dashboard_exprs, metric_names

UPSTREAM_KEY = "upstream-secret"
QUESTIONS = [
    (
        "A 45-year-old man has had a productive cough and fever for three days. What is the likely diagnosis?",
        "Pulmonologist",
    ),
    ("A 30-year-old woman reports palpitations and weight loss. What should be checked?", "Endocrinologist"),
    ("A child has an itchy rash on both elbows since winter. What is the treatment?", "Dermatologist"),
]


def front_env(upstream_base: str, **extra: str) -> dict[str, str]:
    return {
        "MEDASK_ENGINE": "upstream",
        "MEDASK_UPSTREAM_URL": upstream_base,
        "MEDASK_UPSTREAM_API_KEY": UPSTREAM_KEY,
        **extra,
    }


def upstream_env(**extra: str) -> dict[str, str]:
    return {"MEDASK_API_KEYS": UPSTREAM_KEY, **extra}


@pytest.fixture(scope="module")
def pair(
    ci_checkpoint: Path, ci_pack: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    """(upstream in local mode, MedAsk in upstream mode in front of it), same checkpoint and pack."""
    logs = tmp_path_factory.mktemp("upstream")
    evidence = {"MEDASK_EVIDENCE": "true", "MEDASK_EVIDENCE_DIR": str(ci_pack)}
    up = start_server(ci_checkpoint, logs / "upstream.log", **upstream_env(**evidence))
    front = start_server(ci_checkpoint, logs / "front.log", **front_env(up.base, **evidence))
    yield up, front
    stop_server(front)
    stop_server(up)


def ask(server: Server, question: str, role: str, **extra: object) -> dict:
    body = {"question": question, "role": role, "max_new_tokens": 40, **extra}
    r = httpx.post(f"{server.base}/ask", json=body, headers=server.headers(UPSTREAM_KEY), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ask_stream(server: Server, question: str, role: str) -> tuple[str, dict]:
    body = {"question": question, "role": role, "max_new_tokens": 40, "stream": True}
    text, summary = "", None
    with httpx.stream("POST", f"{server.base}/ask", json=body, headers=server.headers(UPSTREAM_KEY), timeout=60) as r:
        assert r.status_code == 200
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "token":
                    text += data["text"]
                elif event == "summary":
                    summary = data
                assert event != "error", data
    assert summary is not None
    return text, summary


def test_ask_gives_the_same_answer_and_perplexity_in_both_modes(pair: tuple[Server, Server]) -> None:
    up, front = pair
    for question, role in QUESTIONS:
        local, remote = ask(up, question, role), ask(front, question, role)
        assert remote["answer"] == local["answer"]
        assert remote["usage"] == local["usage"]
        assert remote["perplexity"] == pytest.approx(local["perplexity"], rel=1e-3)
        assert remote["perplexity_note"] is None
        assert remote["citations"] == local["citations"] and remote["citations"]  # evidence stays MedAsk's
        assert remote["triage"] == local["triage"]
        # streamed through the upstream's stream (MedAsk streams no per-chunk log-probs: the answer
        # is then scored with echo + logprobs, as it would be behind any such upstream)
        streamed, summary = ask_stream(front, question, role)
        assert streamed == ask_stream(up, question, role)[0]
        assert summary["answer"] == local["answer"]
        # rescored by the upstream's model forward (float32 LM head), where the answer's own log-probs
        # came from its static decode step (bfloat16 LM head): 0.1-0.2% apart
        assert summary["perplexity"] == pytest.approx(local["perplexity"], rel=5e-3)


def test_emergency_advice_and_refusals_hold_in_upstream_mode(pair: tuple[Server, Server]) -> None:
    _, front = pair
    emergency = ask(
        front, "My father has crushing chest pain spreading to his left arm and is sweating.", "Cardiologist"
    )
    assert emergency["triage"]["level"] == "emergency"
    assert emergency["answer"].startswith(emergency["triage"]["advice"][:40])
    off_topic = ask(front, "Write me a poem about the stock market and bitcoin prices.", "General Practitioner")
    assert off_topic["finish_reason"] == "refused"


def test_scoring_routes_agree_in_both_modes(pair: tuple[Server, Server]) -> None:
    up, front = pair
    items = {
        "items": [
            {"text": "Pneumonia is usually treated with antibiotics."},
            {"question": QUESTIONS[0][0], "answer": "Community-acquired pneumonia.", "role": "Pulmonologist"},
        ],
        "token_logprobs": True,
    }
    got = [
        httpx.post(f"{s.base}/perplexity", json=items, headers=s.headers(UPSTREAM_KEY), timeout=60).json()["results"]
        for s in (up, front)
    ]
    for a, b in zip(*got, strict=True):
        assert b["tokens"] == a["tokens"]
        assert b["token_logprobs"] == pytest.approx(a["token_logprobs"], abs=2e-3)
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-3)
    body = {
        "model": "medask-ci",
        "prompt": "The patient has a fever and",
        "max_tokens": 6,
        "echo": True,
        "logprobs": 2,
        "temperature": 0,
    }
    done = []
    for s in (up, front):
        r = httpx.post(f"{s.base}/v1/completions", json={**body, "model": model_id(s)}, headers=s.headers(UPSTREAM_KEY))
        assert r.status_code == 200, r.text
        done.append(r.json()["choices"][0])
    assert done[1]["text"] == done[0]["text"]
    assert done[1]["logprobs"]["tokens"] == done[0]["logprobs"]["tokens"]
    assert done[1]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        done[0]["logprobs"]["token_logprobs"][1:], abs=2e-3
    )


def model_id(server: Server) -> str:
    return httpx.get(f"{server.base}/v1/models", headers=server.headers(UPSTREAM_KEY)).json()["data"][0]["id"]


def test_info_and_metrics_name_the_upstream(pair: tuple[Server, Server]) -> None:
    up, front = pair
    info = httpx.get(f"{front.base}/info", headers=front.headers(UPSTREAM_KEY)).json()
    assert info["engine"]["name"] == "upstream"
    assert info["engine"]["url"] == up.base
    assert info["engine"]["model"] == model_id(up)
    assert info["engine"]["available"] and info["engine"]["scores_prompts"]
    assert httpx.get(f"{up.base}/info", headers=up.headers(UPSTREAM_KEY)).json()["engine"]["name"] == "local"
    metrics = httpx.get(f"{front.base}/metrics", headers=front.headers(UPSTREAM_KEY)).text
    assert f'medask_upstream_up{{url="{up.base}"}} 1.0' in metrics
    assert 'medask_upstream_request_seconds_count{kind="generate"}' in metrics
    # what the dashboard and alerts ask of upstream mode is exported here (errors: once one happened)
    exported = set(re.findall(r"^(medask_[a-z_]+)", metrics, flags=re.M))
    wanted = {m for e in dashboard_exprs() + alert_exprs() for m in metric_names(e) if m.startswith(UPSTREAM_METRICS)}
    assert wanted and wanted - {"medask_upstream_errors_total"} <= exported


def test_a_slow_upstream_is_a_timeout_and_then_recovers(
    pair: tuple[Server, Server], ci_checkpoint: Path, tmp_path: Path
) -> None:
    up, _ = pair
    # probes far apart: the frozen upstream is met by the request, not by a probe first
    front = start_server(
        ci_checkpoint,
        tmp_path / "front.log",
        **front_env(up.base, MEDASK_UPSTREAM_TIMEOUT_S="1", MEDASK_UPSTREAM_PROBE_S="60"),
    )
    try:
        os.kill(up.proc.pid, signal.SIGSTOP)  # frozen: it accepts connections, never answers
        try:
            r = httpx.post(f"{front.base}/ask", json={"question": QUESTIONS[0][0]}, timeout=30)
        finally:
            os.kill(up.proc.pid, signal.SIGCONT)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["type"] == "upstream_timeout"
        assert "MEDASK_UPSTREAM_TIMEOUT_S" in r.json()["error"]["message"]
        assert ask(front, *QUESTIONS[1])["answer"]
    finally:
        stop_server(front)


def test_a_wrong_model_name_keeps_the_service_not_ready(
    pair: tuple[Server, Server], ci_checkpoint: Path, tmp_path: Path
) -> None:
    up, _ = pair
    front = start_server(
        ci_checkpoint,
        tmp_path / "front.log",
        wait_ready=False,
        **front_env(up.base, MEDASK_UPSTREAM_MODEL="llama-2-7b-typo"),
    )
    try:
        r = wait_for(front, lambda r: r.status_code == 503 and "llama-2-7b-typo" in r.text)
        message = r.json()["error"]["message"]
        assert model_id(up) in message and "MEDASK_UPSTREAM_MODEL" in message
        r = httpx.post(f"{front.base}/ask", json={"question": QUESTIONS[0][0]}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "upstream_unavailable"
    finally:
        stop_server(front)


def wait_for(server: Server, ok, path: str = "/ready", within_s: float = 60) -> httpx.Response:
    deadline = time.monotonic() + within_s
    while True:
        try:
            r = httpx.get(f"{server.base}{path}", timeout=5)
            if ok(r):
                return r
        except httpx.HTTPError:
            r = None
        assert time.monotonic() < deadline, f"condition never met; last: {r and r.text}\n{server.log_text()[-2000:]}"
        time.sleep(0.2)


def test_upstream_down_at_start_then_up_then_dying_mid_stream(ci_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    front = start_server(
        ci_checkpoint,
        tmp_path / "front.log",
        wait_ready=False,
        **front_env(f"http://127.0.0.1:{port}", MEDASK_UPSTREAM_PROBE_S="0.5"),
    )
    up = None
    try:
        # loaded, but nothing computes: not ready, with the reason; requests are refused, not hung
        r = wait_for(front, lambda r: r.status_code == 503 and "upstream" in r.text)
        assert r.json()["status"] == "upstream_unavailable"
        assert f"127.0.0.1:{port}" in r.json()["error"]["message"]
        r = httpx.post(f"{front.base}/ask", json={"question": QUESTIONS[0][0]}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "upstream_unavailable"
        assert httpx.get(f"{front.base}/health").status_code == 200  # alive: no restart needed
        metrics = httpx.get(f"{front.base}/metrics").text
        assert 'medask_upstream_errors_total{reason="connect"}' in metrics
        assert f'medask_upstream_up{{url="http://127.0.0.1:{port}"}} 0.0' in metrics

        up = start_server(ci_checkpoint, tmp_path / "upstream.log", port=port, **upstream_env())
        wait_for(front, lambda r: r.status_code == 200)
        assert ask(front, *QUESTIONS[0])["answer"]

        # a long stream; the upstream dies after its first piece: the client gets a clear error event
        body = {
            "model": model_id(front),
            "prompt": "The patient has",
            "max_tokens": 480,
            "ignore_eos": True,
            "stream": True,
        }
        events: list[tuple[str | None, dict]] = []
        with httpx.stream("POST", f"{front.base}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            event = None
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and line != "data: [DONE]":
                    events.append((event, json.loads(line[5:])))
                    if len(events) == 1:
                        up.proc.kill()
        assert events[-1][0] == "error"
        assert events[-1][1]["error"]["type"] == "upstream_error"
        assert not any(c.get("finish_reason") for _, e in events[:-1] for c in e.get("choices", []))
        r = wait_for(front, lambda r: r.status_code == 503)  # the breaker opened
        assert r.json()["error"]["type"] == "upstream_unavailable"
    finally:
        stop_server(front)
        if up is not None:
            stop_server(up)
