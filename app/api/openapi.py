"""The OpenAPI document as clients and fuzzers need it: the bearer scheme on
every route that checks keys, and the one error shape on every error status.

FastAPI documents only what route decorators declare; the Gateway middleware
(auth, body limit) and the exception handlers answer statuses no decorator
knows about, so they are added here from the same rules the middleware uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.schemas import ErrorResponse
from app.api.security import PROBES

_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_JSON_ERROR = {"application/json": {"schema": _REF}}
# statuses any route may answer: the middleware's and the handlers' own
_ALWAYS = {
    "404": "No such route",
    "405": "Method not allowed (see Allow)",
    "413": "Body too large",
}
_SECURED = {"401": "Missing or invalid API key"}
_NEEDS_MODEL = {"503": "Model not loaded yet"}


def install_openapi(app: FastAPI, public: Callable[[str], bool]) -> None:
    """Replace ``app.openapi`` with one that adds security and error responses."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        with warnings.catch_warnings():  # "Duplicate Operation ID" for GET + HEAD routes: made unique below
            warnings.filterwarnings("ignore", message="Duplicate Operation ID")
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {})["ErrorResponse"] = ErrorResponse.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        components["schemas"].update(components["schemas"]["ErrorResponse"].pop("$defs", {}))
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        for path, operations in doc.get("paths", {}).items():
            for method, op in operations.items():
                # a route serving GET and HEAD gets one id from FastAPI (from whichever method it lists first,
                # so it changed between runs): each operation's id names its own method, as generators need
                if "operationId" in op and len(operations) > 1:
                    op["operationId"] = f"{op['operationId'].rsplit('_', 1)[0]}_{method}"
                responses = op.setdefault("responses", {})
                extra = dict(_ALWAYS)
                if not public(path):
                    op["security"] = [{"bearerAuth": []}]
                    extra.update(_SECURED)
                if path not in (*PROBES, "/metrics"):
                    extra.update(_NEEDS_MODEL)
                for status, description in extra.items():
                    responses.setdefault(status, {"description": description})
                for status, response in responses.items():
                    if status.startswith(("4", "5")):
                        response["content"] = _JSON_ERROR
        app.openapi_schema = doc
        return doc

    app.openapi = build  # type: ignore[method-assign]
