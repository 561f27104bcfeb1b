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
    engine, scheduler = svc.require_ready()
    out = engine.info()
    out["model"] = svc.model_name
    if svc.safety is not None:
        out["safety"] = svc.safety.info()
    k, max_tokens = svc.evidence_contract()
    out["evidence"] = {
        "enabled": svc.evidence is not None,
        "note": svc.evidence_note,
        "k": k,
        "max_tokens": max_tokens,
        "pack": svc.evidence.info() if svc.evidence is not None else None,
        "trained_with": (engine.manifest.get("recipe") or {}).get("evidence"),
    }
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
        "max_batch_size": scheduler.max_batch,
        "queue_size": svc.settings.queue_size,
        "continuous_batching": scheduler.continuous,
        "batches_run": scheduler.batches,
        "admitted_into_running_batches": scheduler.admitted,
        # left the queue unrun: past their deadline, or their client had gone
        "dropped_unrun": scheduler.dropped,
        "max_batch_tokens": scheduler.policy.max_batch_tokens,
        "key_queue_limit": scheduler.policy.key_limit,
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
