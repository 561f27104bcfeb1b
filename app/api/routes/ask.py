"""POST /ask: a clinical question answered in a role; GET /roles."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from app.api.routes import ERRORS, STREAMED, ServingDep
from app.api.schemas import DISCLAIMER, AskRequest, AskResponse, Usage
from app.clinical.evidence import Passage
from app.clinical.grounding import Grounding
from app.clinical.quality import Quality
from app.clinical.safety import Triage
from app.engine.local import GenerationResult, SamplingParams
from app.serving import Serving, new_id, sse

router = APIRouter(tags=["clinical"])


def _summary(
    svc: Serving,
    req: AskRequest,
    rid: str,
    triage: Triage,
    result: GenerationResult | None,
    t0: float,
    passages: list[Passage] | None = None,
    delivered: tuple[str, Quality, Grounding] | None = None,
) -> dict[str, Any]:
    """The response; ``delivered`` is a stream's (answer, quality, grounding): exactly what it sent."""
    note = None
    grounding, source = None, None
    if result is None:  # refused by the rule layer: no model call, nothing to score
        answer, perplexity, quality, finish = svc.refusal(triage), None, None, "refused"
        prompt_tokens = completion_tokens = 0
    else:
        answer, q, g = delivered or svc.answer(result, req.question, triage, passages or [], req.grounding)
        grounding, source = g.public(), g.answer_source
        perplexity = round(result.perplexity, 4) if result.perplexity is not None else None
        quality, note = q.public(), svc.perplexity_note(result)
        finish = result.finish
        prompt_tokens, completion_tokens = result.prompt_tokens, result.completion_tokens
    return AskResponse(
        id=rid,
        answer=answer,
        role=req.role,
        perplexity=perplexity,
        perplexity_note=note,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
        finish_reason=finish,
        triage=triage.public(),
        quality=quality,
        citations=[p.citation() for p in passages or []],
        answer_source=source,
        grounding=grounding,
        model=svc.model_name,
        disclaimer=DISCLAIMER,
        latency_ms=round((time.perf_counter() - t0) * 1000, 1),
    ).model_dump()


def advice_events(triage: Triage) -> list[str]:
    """What a stream sends before any model text: the triage, then the fixed advice as text."""
    events = [sse(triage.public(), "triage")]
    if triage.prefix:
        events.append(sse({"text": triage.prefix + "\n\n"}, "token"))
    return events


@router.post(
    "/ask",
    response_model=AskResponse,
    responses={
        **ERRORS,
        200: {
            "description": "The answer; with stream=true, Server-Sent Events: one `triage` event, the fixed safety "
            "advice and the answer as `token` events, then a `summary` event (the object above)",
            **STREAMED,
        },
    },
    summary="Answer a clinical question in a role, with triage, cited evidence and a quality gate",
)
async def ask(req: AskRequest, request: Request, svc: ServingDep) -> Any:
    t0 = time.perf_counter()
    svc.require_ready()
    triage = await svc.triage_conversation(req.turns, req.question)
    rid = new_id("ask")
    if not triage.in_scope:  # the rule layer is sure: no model call
        svc.note(request, 0, 0, question=req.question, role=req.role)
        summary = _delivered(svc, request, _summary(svc, req, rid, triage, None, t0))
        if req.stream:
            return svc.events(
                [*advice_events(triage), sse({"text": summary["answer"]}, "token"), sse(summary, "summary")]
            )
        return summary
    prompt, passages = svc.prompt(
        req.question, req.role, req.max_new_tokens, "max_new_tokens", req.evidence, req.evidence_k, req.turns
    )
    params = SamplingParams(req.max_new_tokens, req.temperature, req.top_p, req.seed)
    if req.stream:
        # sentences are sent once complete and checked against the citations: a withheld one never leaves
        gate = svc.gate(req.question, passages, req.grounding)

        def on_done(result: GenerationResult) -> list[str]:
            tail, answer, quality, grounding = svc.finish_stream(gate, result, req.question, triage)
            summary = _summary(svc, req, rid, triage, result, t0, passages, (answer, quality, grounding))
            events = [sse({"text": tail}, "token")] if tail else []
            return [*events, sse(_delivered(svc, request, summary), "summary")]

        return svc.stream(
            request,
            prompt,
            params,
            on_piece=lambda piece: sse({"text": text}, "token") if (text := gate.feed(piece)) else "",
            on_done=on_done,
            audit={"question": req.question, "role": req.role},
            preamble=advice_events(triage),
        )
    result = await svc.generate(request, prompt, params)
    svc.note(request, result.prompt_tokens, result.completion_tokens, question=req.question, role=req.role)
    return _delivered(svc, request, _summary(svc, req, rid, triage, result, t0, passages))


def _delivered(svc: Serving, request: Request, summary: dict[str, Any]) -> dict[str, Any]:
    """The audit digest is of the answer the client was given (advice and gate included)."""
    svc.note(request, 0, 0, answer=summary["answer"])
    return summary


@router.get("/roles", summary="Configured specialties (free-text roles up to 64 characters are accepted too)")
async def roles(svc: ServingDep) -> dict[str, Any]:
    return {"roles": list(svc.settings.role_list), "free_text_max_chars": 64, "default": "General Practitioner"}
