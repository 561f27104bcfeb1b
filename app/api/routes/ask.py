"""POST /ask: a clinical question answered in a role; GET /roles."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from app.api.routes import ERRORS, STREAMED, ServingDep, open_door, remember
from app.api.schemas import DISCLAIMER, AskRequest, AskResponse, Usage
from app.api.streaming import fixed_events, new_id, sse
from app.clinical.clinic import Answer, Consult, Plan
from app.engine.base import GenerationResult

router = APIRouter(tags=["clinical"])


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
    ready, runner = open_door(svc, request)
    plan = await ready.clinic.prepare(
        Consult(
            req.question,
            req.role,
            req.turns,
            req.max_new_tokens,
            "max_new_tokens",
            req.evidence,
            req.evidence_k,
            req.grounding,
        )
    )
    runner.note(request, 0, 0, question=req.question, role=req.role)
    rid = new_id("ask")
    if plan.refused:  # the rule layer is sure: no model call
        refusal = ready.clinic.deliver(plan, None)
        remember(svc, rid, "ask", plan, refusal)
        summary = _summary(svc.model_name, req, rid, plan, refusal, None, t0)
        runner.note(request, 0, 0, answer=summary["answer"])
        if not req.stream:
            return summary
        return fixed_events([*_advice(plan), sse({"text": summary["answer"]}, "token"), sse(summary, "summary")])
    params = req.to_sampling_params()
    if req.stream:
        # sentences are sent once complete and checked against the citations: a withheld one never leaves
        answer = ready.clinic.stream(plan)

        def on_done(result: GenerationResult) -> list[str]:
            tail, delivered = answer.close(result)
            remember(svc, rid, "ask", plan, delivered)  # queued before the summary leaves: feedback can follow it
            summary = _summary(svc.model_name, req, rid, plan, delivered, result, t0)
            runner.note(request, 0, 0, answer=summary["answer"])
            return [*([sse({"text": tail}, "token")] if tail else []), sse(summary, "summary")]

        return runner.stream(
            request,
            plan.prompt,
            params,
            on_piece=lambda piece: sse({"text": text}, "token") if (text := answer.feed(piece)) else "",
            on_done=on_done,
            preamble=_advice(plan),
        )
    result = await runner.generate(request, plan.prompt, params)
    delivered = ready.clinic.deliver(plan, result)
    remember(svc, rid, "ask", plan, delivered)
    summary = _summary(svc.model_name, req, rid, plan, delivered, result, t0)
    # the audit digest is of the answer the client was given (advice and gate included)
    runner.note(request, result.prompt_tokens, result.completion_tokens, answer=summary["answer"])
    return summary


def _advice(plan: Plan) -> list[str]:
    """What a stream sends before any model text: the triage, then the fixed advice as text."""
    events = [sse(plan.triage.public(), "triage")]
    if plan.triage.prefix:
        events.append(sse({"text": plan.triage.prefix + "\n\n"}, "token"))
    return events


def _summary(
    model: str, req: AskRequest, rid: str, plan: Plan, answer: Answer, result: GenerationResult | None, t0: float
) -> dict[str, Any]:
    """The response object (a stream's ``summary`` event): exactly what was delivered."""
    prompt_tokens = result.prompt_tokens if result is not None else 0
    completion_tokens = result.completion_tokens if result is not None else 0
    g = answer.grounding
    return AskResponse(
        id=rid,
        answer=answer.text,
        role=req.role,
        perplexity=round(answer.perplexity, 4) if answer.perplexity is not None else None,
        perplexity_note=answer.perplexity_note,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
        finish_reason=result.finish if result is not None else "refused",
        triage=plan.triage.public(),
        quality=answer.quality.public() if answer.quality is not None else None,
        citations=plan.citations(),
        answer_source=g.answer_source if g is not None else None,
        grounding=g.public() if g is not None else None,
        model=model,
        disclaimer=DISCLAIMER,
        latency_ms=round((time.perf_counter() - t0) * 1000, 1),
    ).model_dump()


@router.get("/roles", summary="Configured specialties (free-text roles up to 64 characters are accepted too)")
async def roles(svc: ServingDep) -> dict[str, Any]:
    return {"roles": list(svc.settings.role_list), "free_text_max_chars": 64, "default": "General Practitioner"}
