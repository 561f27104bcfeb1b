"""Probes, model facts and Prometheus metrics."""

from __future__ import annotations

import platform
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.routes import ServingDep
from app.errors import error_body
from app.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])

ABOUT = (
    "A small demonstration model trained here from scratch on 2 CPU cores ({params} parameters): "
    "NOT clinically useful. Build a real model from a local Llama-family base with the `paper` recipe on a GPU."
)


@router.api_route("/health", methods=["GET", "HEAD"], summary="Liveness: 200 while the process works")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.api_route(
    "/ready",
    methods=["GET", "HEAD"],
    summary="Readiness: 200 once the model is loaded and a warm-up generation succeeded (upstream engine: "
    "while the upstream answers)",
    responses={503: {"description": "Not ready, with the reason"}},
)
async def ready(svc: ServingDep) -> Any:
    down = svc.unavailable() if svc.ready else None
    if svc.ready and down is None:
        return {"status": "ready", "model": svc.model_name}
    if down is not None:  # loaded, but the upstream engine that computes is not answering
        body = {**error_body("upstream_unavailable", f"not ready: {down}"), "status": "upstream_unavailable"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
    message = f"not ready: {svc.load_error or 'model is ' + svc.state.replace('_', ' ')}"
    body = {**error_body("service_unavailable", message), "status": svc.state}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/info", summary="The served model: name, base, quantization, kernel, device, held-out metrics, versions")
async def info(svc: ServingDep) -> dict[str, Any]:
    ready = svc.require_ready()
    engine, scheduler, clinic = ready.engine, ready.scheduler, ready.clinic
    out = engine.info()
    out["model"] = svc.model_name
    out["safety"] = clinic.safety.info()
    k, max_tokens = clinic.evidence_contract()
    out["evidence"] = {
        "enabled": clinic.evidence is not None,
        "note": clinic.evidence_note,
        "k": k,
        "max_tokens": max_tokens,
        "pack": clinic.evidence.info() if clinic.evidence is not None else None,
        "trained_with": (engine.manifest.get("recipe") or {}).get("evidence"),
    }
    out["feedback"] = svc.feedback.info() if svc.feedback is not None else {"enabled": False}
    out["serving_contract"] = {**clinic.contract.to_json(), "source": clinic.contract.source}
    gen = engine.manifest.get("heldout_generation") or {}
    out["quality_gate"] = {
        "perplexity_reference_rows": gen.get("rows"),
        "heldout_degenerate_rate": gen.get("degenerate_rate"),
    }
    if engine.manifest.get("recipe", {}).get("base", {}).get("path") is None:  # built from scratch here
        params = engine.manifest.get("parameters")
        out["about"] = ABOUT.format(params=f"{params / 1e6:.1f}M" if params else "a few million")
    out["serving"] = {
        "batching": svc.settings.batching,
        "queue_size": svc.settings.queue_size,
        **scheduler.info(),
        "python": platform.python_version(),
    }
    return out


@router.get(
    "/metrics",
    summary="Prometheus metrics (medask_ prefix)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(svc: ServingDep) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)
