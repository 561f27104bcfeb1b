"""Clinicians' feedback over HTTP against the live test server (API keys, an admin key, text storage on):
rate and correct an answer, the admin matrix on every feedback route, summary, export and metrics; then the
next DPO round: the export becomes pairs (`python -m training preferences`) and a `ci` run with
`dpo.feedback_pairs` trains on them, its report counting them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

from tests.conftest import ADMIN_KEY, API_KEYS, CI_RECIPE, Server, run_training

ROUTES = [
    ("GET", "/feedback/summary"),
    ("GET", "/feedback/export"),
    ("DELETE", "/feedback/00000000-0000-0000-0000-000000000000"),
    ("DELETE", "/feedback?older_than_days=3650"),
]


def _ask(server: Server, question: str, stream: bool = False) -> str:
    body = {"question": question, "max_new_tokens": 16, "stream": stream}
    if not stream:
        r = httpx.post(f"{server.base}/ask", json=body, headers=server.headers(), timeout=120)
        assert r.status_code == 200
        return r.json()["id"]
    with httpx.stream("POST", f"{server.base}/ask", json=body, headers=server.headers(), timeout=120) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    return events[-1]["id"]


def _feedback(server: Server, answer_id: str, key: str = API_KEYS[0], **extra: object) -> httpx.Response:
    body = {"answer_id": answer_id, "rating": "down", "reasons": ["incomplete"], **extra}
    return httpx.post(f"{server.base}/feedback", json=body, headers=server.headers(key), timeout=30)


def test_rate_and_correct_an_answer_then_an_admin_reads_it(server: Server) -> None:
    answer_id = _ask(server, "A 60-year-old has crushing chest pain for an hour. Next step?")
    correction = "Call an ambulance now: ECG within 10 minutes, aspirin unless allergic."
    r = _feedback(server, answer_id, correction=correction, rater_role="Emergency Physician")
    assert r.status_code == 201 and r.json()["answer_id"] == answer_id and r.json()["correction_stored"] is True
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    summary = httpx.get(f"{server.base}/feedback/summary", headers=admin).json()
    assert (
        summary["feedback"] >= 1 and summary["by_reason"]["incomplete"] >= 1 and summary["store"]["store_text"] is True
    )
    lines = [json.loads(x) for x in httpx.get(f"{server.base}/feedback/export", headers=admin).text.splitlines()]
    mine = [x for x in lines if x["answer"]["id"] == answer_id]
    assert mine and mine[0]["correction"] == correction and mine[0]["answer"]["answer"]
    metrics = httpx.get(f"{server.base}/metrics", headers=server.headers()).text
    assert 'medask_feedback_total{rating="down",reason="incomplete"}' in metrics
    info = httpx.get(f"{server.base}/info", headers=server.headers()).json()
    assert info["feedback"]["enabled"] is True and info["feedback"]["backend"] == "sqlite"


def test_a_streamed_answer_can_be_rated_as_soon_as_it_ends(server: Server) -> None:
    answer_id = _ask(server, "What helps a tension headache?", stream=True)
    assert _feedback(server, answer_id).status_code == 201


def test_unknown_answers_and_bad_feedback_are_clear_errors(server: Server) -> None:
    r = _feedback(server, "ask-does-not-exist")
    assert r.status_code == 404 and r.json()["error"]["type"] == "answer_not_found"
    answer_id = _ask(server, "Cough for two days?")
    for bad in ({"rating": "meh"}, {"reasons": ["because"]}, {"correction": "   "}):
        r = _feedback(server, answer_id, **bad)
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"


def test_who_may_do_what_on_every_feedback_route(server: Server) -> None:
    for method, path in ROUTES:
        nokey = httpx.request(method, f"{server.base}{path}")
        user = httpx.request(method, f"{server.base}{path}", headers=server.headers())
        admin = httpx.request(method, f"{server.base}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert nokey.status_code == 401, (method, path)
        assert user.status_code == 403 and user.json()["error"]["type"] == "permission_denied", (method, path)
        assert admin.status_code in (200, 404), (method, path)  # 404: that feedback id does not exist
    assert httpx.post(f"{server.base}/feedback", json={}).status_code == 401


def test_feedback_becomes_the_next_dpo_round(server: Server, ci_run: dict[str, Path], tmp_path: Path) -> None:
    answer_id = _ask(server, "My father has a fever of 39 and is confused since this morning. What now?")
    correction = "New confusion with fever is an emergency: call an ambulance; sepsis and meningitis must be excluded."
    assert _feedback(server, answer_id, correction=correction).status_code == 201
    export = tmp_path / "export.jsonl"
    export.write_text(
        httpx.get(f"{server.base}/feedback/export", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    )
    pairs = tmp_path / "pairs.jsonl"
    proc = run_training("preferences", "--from-feedback", str(export), "--out", str(pairs))
    assert "pairs written" in proc.stdout and correction in pairs.read_text()
    # the next round reuses the session's base, evidence and SFT stages; DPO, GPTQ and evaluation run again
    work = tmp_path / "work"
    work.mkdir()
    for stage in ("base", "evidence", "sft"):
        shutil.copytree(ci_run["work"] / stage, work / stage)
    out = tmp_path / "ckpt"
    run_training(
        "run",
        "--recipe",
        str(CI_RECIPE),
        "--out",
        str(out),
        "--work",
        str(work),
        "--set",
        f"dpo.feedback_pairs={pairs}",
    )
    done = json.loads((work / "dpo" / "STAGE_DONE.json").read_text())
    n = len(pairs.read_text().splitlines())
    assert done["pairs_by_source"]["feedback"] == n >= 1
    assert f"{n} from clinicians' feedback" in (out / "report.md").read_text()
