"""API keys, request ids, body limits and the access log, as one ASGI middleware.

The access log is JSON lines with request id, route template, status, latency,
token counts and the caller's key id (a hash prefix, never the key). Request
and response bodies are never logged; with ``MEDASK_AUDIT_HASHES`` a handler
may add sha256 digests of the texts it saw.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app.errors import error_bytes
from app.metrics import Metrics
from app.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBES = frozenset({"/health", "/ready"})
# the clinicians' page (app/api/routes/page.py): its HTML and its static files
UI_PATHS = frozenset({"/", "/ui"})
UI_STATIC = "/ui/static/"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_log = logging.getLogger("medask.access")
log = logging.getLogger("medask")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields given to the logger are merged in."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["traceback"] = self.formatException(record.exc_info)  # inside the one JSON line
        return json.dumps(out, default=str)


# ours and uvicorn's: each gets the one JSON handler and stops there, so a handler that a
# library adds to the root logger later (model loading does) never prints a record twice
JSON_LOGGERS = ("medask", "uvicorn", "uvicorn.error", "uvicorn.access")


def configure_logging(level: str) -> None:
    for name in JSON_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
            for h in list(logger.handlers):  # uvicorn's own plain-text handlers
                logger.removeHandler(h)
            if name in ("medask", "uvicorn"):
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(JsonFormatter())
                logger.addHandler(handler)
        # uvicorn.error / uvicorn.access reach the "uvicorn" handler by propagation, and stop there
        logger.propagate = name not in ("medask", "uvicorn")
    # the gateway writes the one access line per request (medask.access); uvicorn's own would be a second
    # (it is on when the app runs as `uvicorn app.main:app`)
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("medask").setLevel(level.upper())


def is_public(path: str, settings: Settings) -> bool:
    """Routes answered without an API key: the probes, the docs, and /metrics if configured so."""
    if path in PROBES:
        return True
    if path == "/metrics":
        return settings.metrics_public
    if path in UI_PATHS or path.startswith(UI_STATIC):
        return settings.ui_public
    if path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        return settings.docs_are_public
    return False


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def check_key(presented: str, keys: tuple[str, ...]) -> str | None:
    """The matching key's id, comparing every configured key in constant time."""
    match = None
    for k in keys:
        if hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), k.encode()):
            match = key_id(k)
    return match


class _BodyTooLarge(Exception):
    pass


class Gateway:
    """Outermost middleware: request id, auth, body size, metrics, access log."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, tracker: Any = None) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.tracker = tracker  # has .inflight: what a graceful shutdown waits for

    def _public(self, path: str) -> bool:
        return is_public(path, self.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["arrived"] = time.monotonic()  # a request's deadline runs from here, not from when it is queued
        status_holder = {"status": 500, "started": False}

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*list(message["headers"]), (b"x-request-id", rid.encode())]
            await send(message)

        async def reply(status: int, type_: str, msg: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
            body = error_bytes(type_, msg)
            await send_wrapped(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        *(extra or []),
                    ],
                }
            )
            await send_wrapped({"type": "http.response.body", "body": body})

        path = scope.get("path", "")
        caller = None
        counted = self.tracker is not None and path not in PROBES
        if counted:
            self.tracker.inflight += 1
            self.metrics.inflight.inc()
        try:
            if self.settings.keys and not self._public(path):
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                caller = (
                    check_key(token.strip(), self.settings.keys + self.settings.admin_key_list)
                    if scheme.lower() == "bearer" and token.strip()
                    else None
                )
                if caller is None:
                    await reply(
                        401,
                        "authentication_error",
                        "missing or invalid API key: send 'Authorization: Bearer <key>'",
                        [(b"www-authenticate", b"Bearer")],
                    )
                    return
            state["key_id"] = caller
            limit = self.settings.max_body_bytes
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                await reply(413, "request_too_large", f"request body exceeds the {limit}-byte limit")
                return
            seen = 0
            buffered: list[Message] = []
            if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                # a chunked body has no declared size: read it (up to the limit) before any parser sees it,
                # so an over-limit body is a 413 like a sized one, not a parse error
                while True:
                    message = await receive()
                    buffered.append(message)
                    if message["type"] != "http.request":
                        break
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge
                    if not message.get("more_body", False):
                        break

            async def receive_limited() -> Message:
                nonlocal seen
                if buffered:
                    return buffered.pop(0)
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge
                return message

            await self.app(scope, receive_limited, send_wrapped)
        except _BodyTooLarge:
            if not status_holder["started"]:
                await reply(
                    413, "request_too_large", f"request body exceeds the {self.settings.max_body_bytes}-byte limit"
                )
        except Exception as exc:
            # the one place an unhandled error is logged (once, with its traceback) and answered; nothing is
            # re-raised, so the server neither logs it again nor drops the client's keep-alive connection
            log.error(
                "unhandled error",
                exc_info=(type(exc), exc, exc.__traceback__),
                extra={"event": "unhandled", "exc_type": type(exc).__name__, "request_id": rid},
            )
            if not status_holder["started"]:
                await reply(500, "internal_error", "internal error; the request id identifies it in the logs")
        finally:
            if counted:
                self.tracker.inflight -= 1
                self.metrics.inflight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or ("unmatched" if status_holder["status"] == 404 else "other")
            status = status_holder["status"]
            elapsed = time.perf_counter() - t0
            self.metrics.requests.labels(template, str(status)).inc()
            self.metrics.e2e_latency.labels(template).observe(elapsed)
            record = {
                "event": "request",
                "request_id": rid,
                "method": scope.get("method"),
                "route": template,
                "status": status,
                "latency_ms": round(elapsed * 1000, 2),
                "key_id": caller,
            }
            for k in ("prompt_tokens", "completion_tokens", "audit"):
                if k in state:
                    record[k] = state[k]
            access_log.info("request", extra=record)
