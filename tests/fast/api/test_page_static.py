"""The clinicians' page as files and headers (fast: no model, no browser; tests/e2e/api/test_page.py drives
it in Chromium): served at / and /ui with a strict CSP, only its own files, the title escaped, public unless
told otherwise, and absent with MEDASK_UI=false."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


def client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(**settings)))  # not entered: no model is loaded


@pytest.mark.parametrize("path", ["/", "/ui"])
def test_the_page_is_served_with_a_strict_policy(path: str) -> None:
    r = client(api_keys="k1").get(path)  # public by default: the page holds no data
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert refs and all(ref.startswith(("/ui/static/", "#")) for ref in refs), refs
    assert "<script>" not in r.text and not re.search(r"\son[a-z]+=", r.text)  # no inline script or handler


def test_every_file_the_page_names_is_served_and_nothing_else() -> None:
    c = client()
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        r = c.get(f"/ui/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    for name in ("index.html", "__init__.py", "..%2F..%2Fsettings.py", "nope.js"):
        assert c.get(f"/ui/static/{name}").status_code == 404


def test_title_and_institution_are_escaped() -> None:
    r = client(ui_title="<b>Clinic</b>", ui_institution="Hospital & Co <script>").get("/")
    assert "&lt;b&gt;Clinic&lt;/b&gt;" in r.text and "Hospital &amp; Co &lt;script&gt;" in r.text
    assert "<b>Clinic" not in r.text


def test_the_page_can_require_a_key_or_be_turned_off() -> None:
    assert client(api_keys="k1", ui_public=False).get("/").status_code == 401
    assert client(api_keys="k1", ui_public=False).get("/", headers={"Authorization": "Bearer k1"}).status_code == 200
    off = client(ui=False)
    assert off.get("/").status_code == 404 and off.get("/ui/static/app.js").status_code == 404
