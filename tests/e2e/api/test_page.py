"""The clinicians' page in a real browser: Debian's Chromium, headless, driven by Playwright for Python
against the live test server (API keys on, evidence on). Screenshots of the main states go to
runs/screenshots/ (not committed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEYS, ROOT, Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
AXE = ROOT / ".venv" / "node" / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = ROOT / "runs" / "screenshots"
EMERGENCY = "My father has crushing chest pain going to his left arm and is sweating, it started 30 minutes ago"
ROUTINE = "What are the common side effects of metformin?"
PT_EMERGENCY = "Meu pai está com dor forte no peito que vai para o braço esquerdo e está suando frio"

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Visit:
    """One browser context on the page, recording every request it makes."""

    def __init__(self, browser, server: Server, **context) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.server = server
        self.page.goto(server.base + "/")

    def enter_key(self) -> None:
        self.page.locator("#key-section").wait_for(state="visible")  # asked for, after the 401 from /roles
        self.page.fill("#key", API_KEYS[0])
        self.page.press("#key", "Enter")

    def ask(self, question: str) -> None:
        self.page.fill("#question", question)
        self.page.press("#question", "Enter")

    def wait_done(self, timeout: float = 120_000) -> None:
        # a function, not an expression: the page's CSP refuses string evaluation
        self.page.wait_for_function("() => document.querySelector('#stop').disabled", timeout=timeout)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser, server: Server) -> Iterator:
    opened: list[Visit] = []

    def open_(**context) -> Visit:
        v = Visit(browser, server, **context)
        opened.append(v)
        return v

    yield open_
    for v in opened:
        assert all(u.startswith(server.base + "/") for u in v.requests), [
            u for u in v.requests if not u.startswith(server.base)
        ]
        v.close()


def test_emergency_banner_comes_before_any_answer_text_and_sources_are_links(visit, server: Server) -> None:
    v = visit(locale="en-US", permissions=["clipboard-read", "clipboard-write"])
    v.shot("1-key-prompt")
    v.enter_key()
    # record the order in which the banner and the answer's first text appear
    v.page.evaluate(
        """() => { window.__order = [];
        new MutationObserver(() => {
          if (!document.querySelector('#banner').hidden && !window.__order.includes('banner')) window.__order.push('banner');
          if (document.querySelector('#answer').textContent && !window.__order.includes('answer')) window.__order.push('answer');
        }).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true}); }"""
    )
    v.ask(EMERGENCY)
    v.wait_done()
    assert v.page.evaluate("window.__order") == ["banner", "answer"]
    banner = v.page.locator("#banner")
    assert banner.get_attribute("role") == "alert" and "emergency" in banner.get_attribute("class")
    assert "Emergency" in v.page.text_content("#banner-level")
    assert v.page.inner_text("#banner-advice").startswith("EMERGENCY")  # the rule-owned advice, in the banner
    assert not v.page.inner_text("#answer").startswith("EMERGENCY")  # and not twice on screen
    # every source title with a URL is a link to it; every [n] in the answer points at a listed source
    summary = httpx.post(
        f"{server.base}/ask", json={"question": EMERGENCY, "max_new_tokens": 4}, headers=server.headers(), timeout=120
    ).json()
    urls = [c["url"] for c in summary["citations"] if c.get("url")]
    assert urls, "the test question should retrieve sources with URLs"
    hrefs = v.page.eval_on_selector_all("#sources li > a", "els => els.map(e => e.href)")
    assert hrefs == urls
    assert v.page.eval_on_selector_all("#sources li > a", "els => els.every(e => e.target === '_blank')")
    markers = v.page.eval_on_selector_all("#answer a", "els => els.map(e => e.getAttribute('href'))")
    for href in markers:
        assert re.fullmatch(r"#source-\d+", href) and v.page.locator(href).count() == 1
    assert "Made of" in v.page.inner_text("#made-of")
    v.shot("2-emergency-answer")
    # copy with citations: the answer, then its numbered sources, as plain text
    v.page.click("#copy")
    copied = v.page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("EMERGENCY") and "\nSources:\n[1] " in copied
    for i, c in enumerate(summary["citations"], 1):
        assert f"[{i}] {c['title']}" in copied
    assert EMERGENCY not in v.page.url and "question" not in v.page.url  # never in the address


def test_a_routine_question_shows_no_banner_and_follow_ups_carry_the_conversation(visit, server: Server) -> None:
    v = visit(locale="en-US")
    v.enter_key()
    sent: list[dict] = []
    v.page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/ask") else None)
    v.ask(ROUTINE)
    v.wait_done()
    assert v.page.locator("#banner").is_hidden()
    assert v.page.inner_text("#answer").strip()
    v.ask("And in older patients?")
    v.wait_done()
    assert "history" not in sent[0]
    assert [t["role"] for t in sent[1]["history"]] == ["user", "assistant"] and sent[1]["history"][0][
        "content"
    ] == ROUTINE
    assert v.page.locator("#conversation li").count() == 2


@pytest.mark.parametrize(
    ("status", "headers", "expect"),
    [
        (429, {"Retry-After": "7"}, "try again in 7 second"),
        (503, {"Retry-After": "1"}, "cannot answer right now"),
        (413, {}, "too long"),
    ],
)
def test_refusals_are_clear_messages(visit, status: int, headers: dict, expect: str) -> None:
    v = visit(locale="en-US")
    v.enter_key()
    body = {"error": {"type": "x", "message": "the server is shutting down", "param": None, "code": None}}
    v.page.route(
        "**/ask",
        lambda route: route.fulfill(
            status=status, headers=headers, content_type="application/json", body=json.dumps(body)
        ),
    )
    v.ask(ROUTINE)
    v.page.locator("#error").wait_for(state="visible")
    assert expect in v.page.inner_text("#error")
    if status == 503:
        v.shot("3-unavailable")


def test_a_stream_that_ends_with_an_error_event_says_so(visit) -> None:
    v = visit(locale="en-US")
    v.enter_key()
    events = 'event: token\ndata: {"text": "Partial"}\n\nevent: error\ndata: {"error": {"type": "timeout", "message": "request took longer than 40s"}}\n\n'
    v.page.route("**/ask", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=events))
    v.ask(ROUTINE)
    v.page.locator("#error").wait_for(state="visible")
    assert "interrupted" in v.page.inner_text("#error") and "40s" in v.page.inner_text("#error")


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.base}/metrics", headers=server.headers()).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_stop_ends_the_stream_and_the_server_frees_the_slot(visit, server: Server) -> None:
    v = visit(locale="en-US")
    v.enter_key()
    v.ask(EMERGENCY)
    v.page.locator("#banner").wait_for(state="visible")  # the triage event: the stream is open
    v.page.click("#stop")
    v.page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Stopped')")
    deadline = time.time() + 30
    while time.time() < deadline:
        # the scrape itself is the one request in flight
        if (
            _metric(server, "medask_num_requests_running") == 0
            and _metric(server, "medask_http_requests_inflight") == 1
        ):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the stopped request still holds the server")


def test_the_portuguese_interface_and_banner(visit) -> None:
    v = visit(locale="pt-BR")
    assert v.page.evaluate("document.documentElement.lang") == "pt-BR"
    assert v.page.inner_text("#ask") == "Perguntar"
    v.enter_key()
    v.ask(PT_EMERGENCY)
    v.wait_done()
    assert v.page.text_content("#banner-level").lower() == "emergência"
    assert "192" in v.page.inner_text("#banner-advice")  # SAMU, in the question's language
    v.shot("4-portugues")
    v.page.select_option("#lang", "en")  # the switch changes it
    assert v.page.inner_text("#ask") == "Ask" and v.page.text_content("#banner-level") == "Emergency"


def test_keyboard_only_asks_and_reaches_the_sources(visit) -> None:
    v = visit(locale="en-US")
    v.enter_key()  # typed, then Enter
    v.page.keyboard.press("Shift+Tab")  # out of the question box and back: focus is visible and moves
    v.page.keyboard.press("Tab")
    assert v.page.evaluate("document.activeElement.id") == "question"
    v.page.keyboard.type(EMERGENCY)
    v.page.keyboard.press("Enter")
    v.wait_done()
    v.page.focus("#answer a >> nth=0")
    v.page.keyboard.press("Enter")
    assert v.page.evaluate("location.hash").startswith("#source-")


@pytest.mark.skipif(not AXE.is_file(), reason="axe-core is installed by `make install` (npm)")
def test_axe_core_finds_no_serious_or_critical_violation(visit) -> None:
    # axe is injected by the test (the page's own CSP would refuse an injected script: bypassed here only)
    v = visit(locale="en-US", bypass_csp=True)
    v.enter_key()
    v.ask(EMERGENCY)
    v.wait_done()
    v.page.add_script_tag(path=str(AXE))
    result = v.page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    bad = [(x["id"], x["impact"], x["help"]) for x in result["violations"] if x["impact"] in ("serious", "critical")]
    assert bad == []


def test_the_page_needs_nothing_outside_the_app(server: Server) -> None:
    r = httpx.get(f"{server.base}/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text)  # no CDN, no web font, no analytics
    assert "<script>" not in r.text  # no inline script
    assert os.path.basename(r.url.path) == ""


def test_a_clinician_rates_and_corrects_an_answer_on_the_page(visit, server: Server) -> None:
    from tests.conftest import ADMIN_KEY

    v = visit(locale="en-US")
    v.enter_key()
    v.ask(ROUTINE)
    v.wait_done()
    v.page.locator("#feedback-form").wait_for(state="visible")
    v.page.check("#rate-down")
    v.page.check("#r-incomplete")
    v.page.fill("#correction", "Metformin: nausea and diarrhoea are common; lactic acidosis is rare but serious.")
    v.page.click("#send-feedback")
    v.page.wait_for_function("() => document.querySelector('#feedback-status').textContent.startsWith('Thank you')")
    export = httpx.get(f"{server.base}/feedback/export", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert "lactic acidosis is rare" in export and '"incomplete"' in export
