"""The clinicians' page at / and /ui: one HTML file, its script and its style, from app/api/page/.

Every response carries a strict Content-Security-Policy (scripts, styles and requests from this origin
only, no inline script, no framing), so the page works on a hospital network with no internet and loads
nothing from anyone else. The title and institution come from the settings, escaped. Off with
MEDASK_UI=false; served without a key unless MEDASK_UI_PUBLIC=false (the page holds no data: every
question it asks needs the key when keys are set).
"""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from app.api.routes import ServingDep
from app.errors import ApiError

router = APIRouter(include_in_schema=False)
PAGE = Path(__file__).resolve().parents[1] / "page"
STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=4)
def _read(name: str) -> str:
    return (PAGE / name).read_text(encoding="utf-8")


def render_page(title: str, institution: str) -> str:
    return (
        _read("index.html")
        .replace("{{title}}", html.escape(title))
        .replace("{{institution}}", html.escape(institution))
    )


@router.get("/", response_class=HTMLResponse)
@router.get("/ui", response_class=HTMLResponse)
async def page(svc: ServingDep) -> HTMLResponse:
    s = svc.settings
    return HTMLResponse(render_page(s.ui_title, s.ui_institution), headers=HEADERS)


@router.get("/ui/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:  # a fixed list: no path from the request reaches the file system
        raise ApiError(404, "not_found", f"no such file: {name}")
    return Response(_read(name), media_type=STATIC[name], headers=HEADERS)
