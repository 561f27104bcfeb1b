"""POST /ask: a clinical question answered in a role; GET /roles."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from app.engine import GenerationResult, SamplingParams
from app.routes import ERRORS, STREAMED, serving
from app.schemas import DISCLAIMER, AskRequest, AskResponse, Usage
from app.serving import Serving, new_id, sse

router = APIRouter(tags=["clinical"])


def _summary(svc: Serving, req: AskRequest, rid: str, result: GenerationResult, t0: float) -> dict[str, Any]:
    return AskResponse(
        id=rid,
        answer=result.text.strip(),
        role=req.role,
        perplexity=round(result.score.perplexity, 4),
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=len(result.token_ids),
            total_tokens=result.prompt_tokens + len(result.token_ids),
        ),
        finish_reason="stop" if result.finish_reason == "stop" else "length",
        model=svc.model_name,
        disclaimer=DISCLAIMER,
        latency_ms=round((time.perf_counter() - t0) * 1000, 1),
    ).model_dump()


@router.post(
    "/ask",
    response_model=AskResponse,
    responses={
        **ERRORS,
        200: {
            "description": "The answer; with stream=true, Server-Sent Events (token events, then a summary event)",
            **STREAMED,
        },
    },
    summary="Answer a clinical question in a role",
)
async def ask(req: AskRequest, request: Request, svc: Annotated[Serving, Depends(serving)]) -> Any:
    t0 = time.perf_counter()
    engine, _ = svc.require_ready()
    prompt = engine.encode_question(req.question, req.role)
    svc.check_context(len(prompt), req.max_new_tokens, "max_new_tokens")
    params = SamplingParams(req.max_new_tokens, req.temperature, req.top_p, req.seed)
    rid = new_id("ask")
    if req.stream:
        return svc.stream(
            request,
            prompt,
            params,
            on_piece=lambda piece: sse({"text": piece}, "token"),
            on_done=lambda result: [sse(_summary(svc, req, rid, result, t0), "summary")],
            audit={"question": req.question, "role": req.role},
        )
    result = await svc.generate(request, prompt, params)
    svc.note(
        request, result.prompt_tokens, len(result.token_ids), question=req.question, role=req.role, answer=result.text
    )
    return _summary(svc, req, rid, result, t0)


@router.get("/roles", summary="Configured specialties (free-text roles up to 64 characters are accepted too)")
async def roles(svc: Annotated[Serving, Depends(serving)]) -> dict[str, Any]:
    return {"roles": list(svc.settings.role_list), "free_text_max_chars": 64, "default": "General Practitioner"}
