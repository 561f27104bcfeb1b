"""create_app(settings): routers, middleware, and a lifespan that loads ONE engine.

The model loads in a background thread so /health answers at once and /ready
tells the truth (503 with the reason) until the model is loaded and warmed up.
A checkpoint that cannot be served stops the process with a non-zero exit
unless MEDASK_EXIT_ON_LOAD_FAILURE=false (then /ready keeps saying why).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.openai_schemas import UnsupportedParameter
from app.api.openapi import install_openapi
from app.api.routes import ask, feedback, health, openai, page, score
from app.api.security import Gateway, configure_logging, is_public
from app.engine.base import CheckpointError
from app.errors import ApiError, error_body
from app.metrics import Metrics
from app.serving import Serving
from app.settings import Settings

log = logging.getLogger("medask")
LOAD_FAILURE_EXIT = 3

DESCRIPTION = """
MedAsk answers clinical questions in a role ("act as a Cardiologist") from a GPTQ 4-bit checkpoint
published by `training/`. Every answer is decision support, not a diagnosis.

Auth: `Authorization: Bearer <key>` on every route except `/health` and `/ready` when `MEDASK_API_KEYS` is set.
Errors: always `{"error": {"type", "message", "param", "code"}}` (OpenAI's shape).
"""


def _error(
    status: int, type_: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(type_, message, param), status_code=status, headers=headers)


def _load(serving: Serving) -> None:
    try:
        serving.load()
    except CheckpointError as exc:
        log.error("cannot serve the checkpoint: %s", exc, extra={"event": "load_failed"})
        if serving.settings.exit_on_load_failure:
            logging.shutdown()
            os._exit(LOAD_FAILURE_EXIT)
    except Exception:  # anything else while loading is as fatal (Serving.load recorded why)
        log.exception("model load failed", extra={"event": "load_failed"})
        if serving.settings.exit_on_load_failure:
            logging.shutdown()
            os._exit(LOAD_FAILURE_EXIT)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics = Metrics()
    serving = Serving(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for warning in settings.warnings():
            log.warning("UNSAFE CONFIGURATION: %s", warning, extra={"event": "unsafe_config"})
        loader = threading.Thread(target=_load, args=(serving,), name="medask-loader", daemon=True)
        app.state.loader = loader
        loader.start()
        yield
        serving.shutdown()

    # no slash redirects: a redirect would be built from the client's Host header
    app = FastAPI(title="MedAsk", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, redirect_slashes=False)
    app.state.serving = serving
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(UnsupportedParameter)
    async def unsupported(request: Request, exc: UnsupportedParameter) -> JSONResponse:
        return _error(400, "unsupported_parameter", str(exc), exc.field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return _error(400, "invalid_json", "request body is not valid JSON", None)
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}"
        return _error(422, "invalid_request_error", f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}
        # keep the exception's headers: a 405 must say which methods are Allowed
        return _error(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail), None, exc.headers)

    for router in (ask.router, score.router, openai.router, health.router, feedback.router):
        app.include_router(router)
    if settings.ui:  # the clinicians' page (MEDASK_UI=false: / and /ui are 404s)
        app.include_router(page.router)
    app.add_middleware(Gateway, settings=settings, metrics=metrics, tracker=serving)
    if settings.cors_list:  # added last, so outermost: preflights are answered before auth asks for a key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_list),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        )
    install_openapi(app, lambda path: is_public(path, settings))
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app on first access, so importing this
    # module (tests, tools) never loads a model
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
