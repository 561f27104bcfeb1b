"""Triage, the quality gate and cited evidence through the live server on the tiny model."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MARKER, Server, start_server, stop_server

EMERGENCY = (
    f"{MARKER} A 58-year-old man has crushing chest pain radiating to the left arm for 40 minutes, with sweating."
)


def post(server: Server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.base}{path}", json=body, headers=server.headers(), timeout=120, **kw)


def sse_events(server: Server, path: str, body: dict) -> list[tuple[str | None, str]]:
    events: list[tuple[str | None, str]] = []
    with httpx.stream("POST", f"{server.base}{path}", json=body, headers=server.headers(), timeout=120) as r:
        assert r.status_code == 200
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, line[6:]))
                event = None
    return events


def test_ask_puts_rule_advice_first_and_cites_evidence(server: Server) -> None:
    body = post(server, "/ask", {"question": EMERGENCY, "role": "Cardiologist", "max_new_tokens": 16}).json()
    triage = body["triage"]
    assert triage["level"] == "emergency" and "acute_coronary_syndrome" in [f["id"] for f in triage["flags"]]
    assert triage["rules_version"] and triage["advice"].startswith("EMERGENCY")
    assert body["answer"].startswith(triage["advice"] + "\n\n")
    assert body["citations"] and all(
        {"id", "title", "source", "url", "score", "snippet"} <= set(c) for c in body["citations"]
    )
    assert body["quality"]["perplexity_percentile"] is not None
    if body["quality"]["degenerate"]:  # the tiny model's loop: none of it shown unchecked; the sources speak
        assert (body["answer_source"] in ("evidence", "mixed") and "What the sources say:" in body["answer"]) or (
            "The sources add:" in body["answer"]
        )
    # every sentence shown after the advice carries a marker that points to a citation given
    shown = body["answer"][len(triage["advice"]) :]
    markers = {int(n) for n in re.findall(r"\[(\d+)\]", shown)}
    assert markers and markers <= set(range(1, len(body["citations"]) + 1))
    assert body["answer_source"] in ("model", "evidence", "mixed") and body["grounding"]["mode"] == "strict"


def test_streamed_ask_sends_triage_then_advice_before_any_model_text(server: Server) -> None:
    events = sse_events(server, "/ask", {"question": EMERGENCY, "max_new_tokens": 8, "stream": True})
    assert events[0][0] == "triage"
    triage = json.loads(events[0][1])
    assert events[1][0] == "token" and json.loads(events[1][1])["text"] == triage["advice"] + "\n\n"
    summary = json.loads(events[-1][1])
    assert events[-1][0] == "summary" and summary["answer"].startswith(triage["advice"])
    assert summary["citations"] and summary["quality"] is not None


def test_chat_puts_advice_first_plain_and_streamed(server: Server) -> None:
    messages = [{"role": "system", "content": "Cardiologist"}, {"role": "user", "content": EMERGENCY}]
    body = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 8}).json()
    advice = body["triage"]["advice"]
    assert body["triage"]["level"] == "emergency"
    assert body["choices"][0]["message"]["content"].startswith(advice + "\n\n")
    assert body["citations"] and "quality" in body
    events = sse_events(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "stream": True})
    chunks = [json.loads(d) for _, d in events if d != "[DONE]"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": advice + "\n\n"}
    assert chunks[-1]["triage"]["level"] == "emergency" and chunks[-1]["citations"]


def test_an_emergency_said_earlier_in_the_chat_is_still_flagged(server: Server) -> None:
    messages = [
        {"role": "user", "content": "I want to kill myself."},
        {"role": "assistant", "content": "I hear you."},
        {"role": "user", "content": "What should I eat for breakfast?"},
    ]
    body = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4}).json()
    assert body["triage"]["level"] == "crisis"
    assert body["choices"][0]["message"]["content"].startswith("CRISIS")


def test_out_of_scope_is_refused_without_a_model_call(server: Server) -> None:
    def generated() -> float:
        text = httpx.get(f"{server.base}/metrics", headers=server.headers()).text
        return float(
            next(line.split()[-1] for line in text.splitlines() if line.startswith("medask_generation_tokens_total"))
        )

    before = generated()
    body = post(server, "/ask", {"question": "How do I fix the transmission in my car?"}).json()
    assert body["finish_reason"] == "refused" and body["perplexity"] is None and body["quality"] is None
    assert body["triage"]["in_scope"] is False and "outside the scope" in body["answer"]
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Write me a poem."}]}).json()
    assert chat["choices"][0]["finish_reason"] == "content_filter"
    events = sse_events(server, "/ask", {"question": "What is the capital of Australia?", "stream": True})
    assert [e for e, _ in events] == ["triage", "token", "summary"]
    assert generated() == before


def test_portuguese_questions_get_portuguese_advice_first_on_every_route(server: Server) -> None:
    question = f"{MARKER} meu pai de 70 anos ta com dor no peito que vai pro braço e suando frio"
    body = post(server, "/ask", {"question": question, "max_new_tokens": 4}).json()
    triage = body["triage"]
    assert triage["language"] == "pt" and triage["level"] == "emergency"
    assert triage["advice"].startswith("EMERGÊNCIA") and "192" in triage["advice"]
    assert body["answer"].startswith(triage["advice"] + "\n\n") and "inglês" in triage["note"]
    assert triage["findings"]["age_days"] == [70 * 365]
    events = sse_events(server, "/ask", {"question": question, "max_new_tokens": 4, "stream": True})
    assert events[0][0] == "triage" and json.loads(events[1][1])["text"].startswith("EMERGÊNCIA")
    chat = post(
        server, "/v1/chat/completions", {"max_tokens": 4, "messages": [{"role": "user", "content": "quero me matar"}]}
    ).json()
    assert chat["triage"]["level"] == "crisis" and "188" in chat["choices"][0]["message"]["content"].split("\n\n")[0]
    refused = post(server, "/ask", {"question": "Qual a capital da Austrália?"}).json()
    assert refused["finish_reason"] == "refused" and "fora do escopo" in refused["answer"]


def test_a_question_of_invisible_characters_is_empty(server: Server) -> None:
    for question in ("\u200b\u200b", "\ufeff", " \u00ad "):
        r = post(server, "/ask", {"question": question})
        assert r.status_code == 422 and r.json()["error"]["param"] == "question", r.text


def test_evidence_can_be_turned_off_and_sized(server: Server) -> None:
    q = {"question": "Barking cough and stridor in a 3-year-old: treatment?", "max_new_tokens": 4}
    assert post(server, "/ask", {**q, "evidence": False}).json()["citations"] == []
    assert len(post(server, "/ask", {**q, "evidence_k": 1}).json()["citations"]) <= 1
    with_ev = post(server, "/ask", q).json()
    without = post(server, "/ask", {**q, "evidence": False}).json()
    assert with_ev["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]


def test_perplexity_can_score_with_the_evidence_in_context(server: Server) -> None:
    item = {"question": "Fever and a rash that does not fade?", "answer": "Meningococcal sepsis: give antibiotics."}
    plain = post(server, "/perplexity", item).json()["results"][0]
    grounded = post(server, "/perplexity", {**item, "evidence": True}).json()["results"][0]
    assert plain["tokens"] == grounded["tokens"] and plain["perplexity"] != grounded["perplexity"]
    assert post(server, "/perplexity", {"text": "x", "evidence": True}).status_code == 422


def test_info_metrics_and_logs_say_what_happened_without_text(server: Server) -> None:
    info = httpx.get(f"{server.base}/info", headers=server.headers()).json()
    assert info["safety"]["rules_version"] and info["evidence"]["enabled"] is True
    assert info["evidence"]["pack"]["passages"] > 0 and info["evidence"]["k"] == info["evidence"]["trained_with"]["k"]
    post(server, "/ask", {"question": EMERGENCY, "max_new_tokens": 2})
    metrics = httpx.get(f"{server.base}/metrics", headers=server.headers()).text
    assert 'medask_triage_flags_total{flag="acute_coronary_syndrome",level="emergency"}' in metrics
    assert "medask_evidence_retrieval_seconds_count" in metrics and "medask_triage_seconds_count" in metrics
    assert MARKER not in metrics and MARKER not in server.log_text()


def test_service_without_a_pack_says_so(ci_checkpoint: Path, tmp_path: Path) -> None:
    srv = start_server(ci_checkpoint, tmp_path / "s.log", MEDASK_EVIDENCE="false")
    try:
        info = httpx.get(f"{srv.base}/info").json()
        assert info["evidence"]["enabled"] is False and "MEDASK_EVIDENCE=false" in info["evidence"]["note"]
        body = httpx.post(f"{srv.base}/ask", json={"question": "Cough?", "max_new_tokens": 2}).json()
        assert body["citations"] == []
        r = httpx.post(f"{srv.base}/ask", json={"question": "Cough?", "evidence": True})
        assert r.status_code == 400 and r.json()["error"]["type"] == "evidence_unavailable"
    finally:
        stop_server(srv)


@pytest.mark.parametrize("fault", ["rules", "tampered_pack", "missing_pack", "unpinned_pack", "forged_pack"])
def test_a_broken_rule_file_or_pack_stops_the_service(
    fault: str, ci_checkpoint: Path, ci_pack: Path, tmp_path: Path
) -> None:
    import shutil

    env = {"MEDASK_EVIDENCE": "true"}
    if fault == "rules":
        rules = tmp_path / "rules.yaml"
        rules.write_text("version: [unclosed\n")
        env |= {"MEDASK_SAFETY_RULES": str(rules), "MEDASK_EVIDENCE_DIR": str(ci_pack)}
        expect = "not valid YAML"
    elif fault == "tampered_pack":
        pack = shutil.copytree(ci_pack, tmp_path / "pack")
        with (pack / "passages.jsonl").open("a") as fh:
            fh.write("\n")
        env["MEDASK_EVIDENCE_DIR"] = str(pack)
        expect = "passages.jsonl"
    elif fault == "forged_pack":  # edited and re-manifested: it verifies against itself, not the checkpoint
        from tests.conftest import forge_pack

        pack = forge_pack(ci_pack, tmp_path / "pack", "pain", "rest at home and take an antacid")
        env["MEDASK_EVIDENCE_DIR"] = str(pack)
        expect = "the pack this checkpoint names"
    elif fault == "unpinned_pack":  # a pack that verifies against itself but is not the pinned one
        env |= {"MEDASK_EVIDENCE_DIR": str(ci_pack), "MEDASK_EVIDENCE_SHA256": "0" * 64}
        expect = "not the pinned pack"
    else:
        env["MEDASK_EVIDENCE_DIR"] = str(tmp_path / "nowhere")
        expect = "does not exist"
    srv = start_server(ci_checkpoint, tmp_path / "s.log", wait_ready=False, **env)
    try:
        assert srv.proc.wait(timeout=60) == 3
        assert expect in srv.log_text()
    finally:
        stop_server(srv)


def test_grounding_modes_and_a_stream_sends_only_checked_sentences(server: Server) -> None:
    q = {"question": f"{MARKER} Barking cough and stridor in a 3-year-old: what is it and how is it treated?"}
    q["max_new_tokens"] = 48
    strict = post(server, "/ask", q).json()
    off = post(server, "/ask", {**q, "grounding": "off"}).json()
    mark = post(server, "/ask", {**q, "grounding": "mark"}).json()
    assert off["grounding"]["method"] == "off: not checked" and off["answer_source"] == "model"
    assert strict["grounding"]["sentences"] == off["grounding"]["sentences"] or off["quality"]["degenerate"]
    # strict shows no unsupported sentence; mark shows them marked
    assert "[not supported by the cited sources]" not in strict["answer"]
    if mark["grounding"]["supported"] < mark["grounding"]["sentences"]:
        assert "[not supported by the cited sources]" in mark["answer"]
    # the stream sends exactly the strict answer (greedy: the same text), sentence by sentence
    events = sse_events(server, "/ask", {**q, "stream": True})
    streamed = "".join(json.loads(d)["text"] for e, d in events if e == "token")
    summary = json.loads(events[-1][1])
    assert streamed.strip() == summary["answer"].strip()
    if not strict["quality"]["degenerate"]:  # the same sentences, checked the same way, as the plain answer
        assert summary["answer"] == strict["answer"] and summary["grounding"] == strict["grounding"]
    chat = post(
        server, "/v1/chat/completions", {"max_tokens": 24, "messages": [{"role": "user", "content": q["question"]}]}
    )
    body = chat.json()
    assert body["grounding"]["mode"] == "strict" and body["answer_source"] in ("model", "evidence", "mixed")
    assert "[not supported by the cited sources]" not in body["choices"][0]["message"]["content"]


def test_a_conversation_is_bounded_before_any_work_and_triage_leaves_the_loop_free(server: Server) -> None:
    """A long chat once froze the process (240 KB: 78 s without /health): now a 413 before any work."""
    turn = "My chest hurts a little when I climb stairs and I feel tired in the evenings. " * 13  # ~1,000 chars
    messages = []
    for _ in range(30):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": "Go on."}]
    messages.append({"role": "user", "content": "What should I do?"})
    t0 = time.monotonic()
    r = post(server, "/v1/chat/completions", {"max_tokens": 4, "messages": messages})
    assert r.status_code == 413 and r.json()["error"]["type"] == "conversation_too_long", r.text
    assert "MEDASK_MAX_CONVERSATION_CHARS" in r.json()["error"]["message"] and time.monotonic() - t0 < 10
    long_turn = (turn * 4)[:3900]
    history = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "ok"}] * 8
    r = post(server, "/ask", {"question": "And now?", "history": history})
    assert r.status_code == 413 and r.json()["error"]["param"] == "messages"
    # a conversation just under the bound is triaged off the event loop: /health answers meanwhile
    under = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "ok"}] * 5
    with httpx.Client(timeout=60) as client:
        import threading

        done: list[int] = []
        worker = threading.Thread(
            target=lambda: done.append(
                client.post(
                    f"{server.base}/ask",
                    json={"question": "And now?", "history": under, "max_new_tokens": 2},
                    headers=server.headers(),
                ).status_code
            )
        )
        worker.start()
        assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200
        worker.join(60)
    assert done == [200]
