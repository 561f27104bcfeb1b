"""The one error type and the one error shape, used by middleware, routes, probes and streams.

Every error a client sees is ``{"error": {"type", "message", "param", "code"}}``: OpenAI's
shape, so the openai SDK and lm-eval read our errors as they read OpenAI's. ``type`` is the
specific kind (``queue_full``, ``model_not_found`` ...); ``code`` repeats it where OpenAI
defines a code of its own (``model_not_found``), else it is null.
"""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    """An error with its HTTP status, raised anywhere below a route and answered in the one shape."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.param, self.code = status, type_, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.type, self.message, self.param, self.code)


def error_body(type_: str, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "param": param, "code": code}}


def error_bytes(type_: str, message: str, param: str | None = None) -> bytes:
    """The body as bytes, for the ASGI middleware that answers before any route runs."""
    return json.dumps(error_body(type_, message, param)).encode()


def shutting_down() -> ApiError:
    """What work still waiting is told once the drain period is over (and new work while draining)."""
    return ApiError(
        503,
        "shutting_down",
        "the server is shutting down; retry (another replica will answer)",
        headers={"Retry-After": "1"},
    )
