"""POST /perplexity: score text, or an answer given the role prompt and question."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.api.routes import ERRORS, ServingDep, open_door
from app.api.schemas import PerplexityRequest, PerplexityResponse, PerplexityResult
from app.clinical.clinic import EVIDENCE_FRAME_TOKENS
from app.clinical.prompting import render_prompt
from app.clinical.scoring import encode_for_scoring
from app.engine.base import ScoreItem

router = APIRouter(tags=["scoring"])


@router.post(
    "/perplexity", response_model=PerplexityResponse, responses=ERRORS, summary="Perplexity of text or of an answer"
)
async def perplexity(req: PerplexityRequest, request: Request, svc: ServingDep) -> Any:
    ready, runner = open_door(svc, request)
    engine, clinic = ready.engine, ready.clinic
    items: list[ScoreItem] = []
    for i, item in enumerate(req.items or []):
        if item.text is not None:
            context, target = item.context, item.text
        else:
            question, target = item.question or "", item.answer or ""
            context = render_prompt(engine.front, question, item.role)
            if item.evidence:  # the prompt /ask would build, evidence block included
                clinic.require_evidence(f"items[{i}].evidence")
                room = (
                    engine.context_length
                    - engine.count_tokens(context)
                    - engine.count_tokens(target)
                    - EVIDENCE_FRAME_TOKENS
                )
                _, block = clinic.retrieve(item.role, question, None, room)
                context = render_prompt(engine.front, question, item.role, block)
        encoded = encode_for_scoring(engine.front, context, target)  # once: checked here, scored as is
        if len(encoded[0]) > engine.context_length:
            clinic.check_context(len(encoded[0]), 0, f"items[{i}]")
        items.append((context, target, encoded))
    scores = await runner.score(request, items)
    runner.note(request, sum(s.tokens for s in scores), 0)
    results = [
        PerplexityResult(
            **{k: v for k, v in s.metrics().items() if k in PerplexityResult.model_fields},
            token_logprobs=s.token_logprobs if req.token_logprobs else None,
        )
        for s in scores
    ]
    return PerplexityResponse(model=svc.model_name, results=results)
