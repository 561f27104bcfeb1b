"""POST /perplexity: score text, or an answer given the role prompt and question."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from app.prompting import render_prompt
from app.routes import ERRORS, serving
from app.schemas import PerplexityRequest, PerplexityResponse, PerplexityResult
from app.serving import Serving

router = APIRouter(tags=["scoring"])


@router.post(
    "/perplexity", response_model=PerplexityResponse, responses=ERRORS, summary="Perplexity of text or of an answer"
)
async def perplexity(req: PerplexityRequest, request: Request, svc: Annotated[Serving, Depends(serving)]) -> Any:
    engine, _ = svc.require_ready()
    items: list[tuple[str | None, str]] = []
    for i, item in enumerate(req.items or []):
        if item.text is not None:
            pair: tuple[str | None, str] = (None, item.text)
        else:
            pair = (render_prompt(engine.tokenizer, item.question or "", item.role), item.answer or "")
        n = len(engine.encode((pair[0] or "") + pair[1])) + 1
        if n > engine.context_length:
            svc.check_context(n, 0, f"items[{i}]")
        items.append(pair)
    scores = await svc.score(request, items)
    svc.note(request, sum(s.tokens for s in scores), 0)
    results = [
        PerplexityResult(
            **{k: v for k, v in s.metrics().items() if k in PerplexityResult.model_fields},
            token_logprobs=s.token_logprobs if req.token_logprobs else None,
        )
        for s in scores
    ]
    return PerplexityResponse(model=svc.model_name, results=results)
