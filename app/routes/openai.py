"""OpenAI-compatible endpoints, so the openai SDK and lm-evaluation-harness
(`local-completions`) work unchanged.

Chat: the system message is the role ("Cardiologist" or "act as a
Cardiologist"), the last user message is the question, and the prompt is built
by app.prompting like /ask. Completions: raw text, no template; ``echo`` with
``max_tokens=0`` and ``logprobs`` scores the prompt (log-likelihood requests).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from app.engine import Engine, GenerationResult, PromptLogprobs, SamplingParams
from app.prompting import DEFAULT_ROLE, role_problem
from app.routes import ERRORS, STREAMED, serving
from app.schemas import ChatCompletionRequest, CompletionRequest, openai_usage
from app.serving import ApiError, Serving, new_id, sse

router = APIRouter(prefix="/v1", tags=["openai"])
_ACT_AS = re.compile(r"^\s*(?:please\s+)?act\s+as\s+(?:an?\s+)?", re.I)


def role_from_system(content: str | None) -> str:
    if content is None:
        return DEFAULT_ROLE
    role = _ACT_AS.sub("", content).strip().rstrip(".").strip() or DEFAULT_ROLE
    problem = role_problem(role)
    if problem:
        raise ApiError(400, "invalid_request_error", f"system message is used as the role: {problem}", "messages")
    return role


@router.get("/models", summary="The one served model")
async def models(svc: Annotated[Serving, Depends(serving)]) -> dict[str, Any]:
    svc.require_ready()
    return {"object": "list", "data": [{"id": svc.model_name, "object": "model", "created": 0, "owned_by": "medask"}]}


@router.post(
    "/chat/completions",
    responses={**ERRORS, 200: STREAMED},
    summary="OpenAI chat completions (system message = role)",
    description="Beside OpenAI's fields the response carries `triage` (the deterministic red-flag layer: level, "
    "flags, rules_version, in_scope, advice) and `quality` (the answer quality gate); streams carry both in the "
    "final chunk, with `citations` (the evidence in the prompt). Emergency and crisis advice opens the message content (the first streamed chunk). "
    "A question outside medicine is refused without a model call (`finish_reason: content_filter`).",
)
async def chat(req: ChatCompletionRequest, request: Request, svc: Annotated[Serving, Depends(serving)]) -> Any:
    engine, _ = svc.require_ready()
    system = next((m.content for m in req.messages if m.role == "system"), None)
    users = [m.content for m in req.messages if m.role == "user"]
    if not users or not users[-1].strip():
        raise ApiError(400, "invalid_request_error", "messages must include a non-empty user message", "messages")
    question = users[-1].strip()
    if len(question) > 4000:
        raise ApiError(400, "invalid_request_error", "the user message must be at most 4000 characters", "messages")
    role = role_from_system(system)
    # every user turn is triaged: an emergency said earlier in the chat is still one
    triage = svc.triage("\n".join(users))
    cid, created, model = new_id("chatcmpl"), int(time.time()), svc.model_name
    if not triage.in_scope:
        content = svc.refusal(triage)
        svc.note(request, 0, 0, question=question, role=role, answer=content)
        extra = {"triage": triage.public(), "quality": None, "citations": []}
        if req.stream:
            first = _chunk(cid, created, model, {"role": "assistant", "content": content})
            final = {**_chunk(cid, created, model, {}, "content_filter"), "usage": openai_usage(0, 0), **extra}
            return svc.events([sse(first), sse(final), "data: [DONE]\n\n"])
        return _chat_body(cid, created, model, content, "content_filter", openai_usage(0, 0), extra)
    max_new = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if max_new is None:
        bare = len(engine.encode_question(question, role))
        max_new = max(1, min(svc.settings.max_new_tokens_default, engine.context_length - bare))
    prompt, passages = svc.prompt(question, role, max_new, param)
    citations = [p.citation() for p in passages]
    params = SamplingParams(max_new, req.temperature, req.top_p, req.seed)

    def extra(result: GenerationResult) -> tuple[str, dict[str, Any]]:
        content, quality = svc.answer(result, question, triage, passages)
        return content, {"triage": triage.public(), "quality": quality.public(), "citations": citations}

    if req.stream:
        first = {"sent": False}

        def delta(content: str) -> dict[str, Any]:
            out = {"content": content} if first["sent"] else {"role": "assistant", "content": content}
            first["sent"] = True
            return out

        def on_piece(piece: str) -> str:
            return sse(_chunk(cid, created, model, delta(piece)))

        def on_done(result: GenerationResult) -> list[str]:
            final = _chunk(cid, created, model, {}, _finish(result))
            final["usage"] = openai_usage(result.prompt_tokens, len(result.token_ids))
            content, fields = extra(result)
            final.update(fields)
            svc.note(request, 0, 0, answer=content)
            return [sse(final), "data: [DONE]\n\n"]

        preamble = [sse(_chunk(cid, created, model, delta(triage.prefix + "\n\n")))] if triage.prefix else []
        return svc.stream(
            request, prompt, params, on_piece, on_done, audit={"question": question, "role": role}, preamble=preamble
        )
    result = await svc.generate(request, prompt, params)
    content, fields = extra(result)
    svc.note(request, result.prompt_tokens, len(result.token_ids), question=question, role=role, answer=content)
    usage = openai_usage(result.prompt_tokens, len(result.token_ids))
    return _chat_body(cid, created, model, content, _finish(result), usage, fields)


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _chat_body(
    cid: str, created: int, model: str, content: str, finish: str, usage: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage,
        **extra,
    }


def _finish(result: GenerationResult) -> str:
    return "stop" if result.finish_reason == "stop" else "length"


def _logprobs_block(
    engine: Engine, echo: PromptLogprobs | None, result: GenerationResult | None, offset0: int
) -> dict[str, Any]:
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if echo is not None:
        tokens += echo.tokens
        lps += echo.logprobs
        tops += echo.top
        offsets += echo.offsets
    if result is not None:
        pos = offset0
        for tid, lp in zip(result.token_ids, result.logprobs, strict=True):
            piece = engine.tokenizer.decode([tid])
            tokens.append(piece)
            lps.append(lp)
            tops.append({piece: lp})
            offsets.append(pos)
            pos += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@router.post(
    "/completions",
    responses={**ERRORS, 200: STREAMED},
    summary="OpenAI completions: raw text, echo + logprobs + max_tokens=0 for scoring",
)
async def completions(req: CompletionRequest, request: Request, svc: Annotated[Serving, Depends(serving)]) -> Any:
    engine, _ = svc.require_ready()
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if req.stream and len(prompts) > 1:
        raise ApiError(400, "invalid_request_error", "stream supports a single prompt", "prompt")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "invalid_request_error", "max_tokens=0 needs echo=true (score the prompt)", "max_tokens")
    encoded = [engine.encode(p) for p in prompts]
    for ids in encoded:
        if not ids:
            raise ApiError(400, "invalid_request_error", "prompt encodes to no tokens", "prompt")
        svc.check_context(len(ids), req.max_tokens, "max_tokens")
    cid, created = new_id("cmpl"), int(time.time())
    params = SamplingParams(max(req.max_tokens, 1), req.temperature, req.top_p, req.seed)

    if req.stream:

        def on_piece(piece: str) -> str:
            return sse(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": svc.model_name,
                    "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}],
                }
            )

        def on_done(result: GenerationResult) -> list[str]:
            svc.note(request, 0, 0, answer=result.text)
            return [
                sse(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": svc.model_name,
                        "choices": [{"index": 0, "text": "", "finish_reason": _finish(result), "logprobs": None}],
                        "usage": openai_usage(result.prompt_tokens, len(result.token_ids)),
                    }
                ),
                "data: [DONE]\n\n",
            ]

        return svc.stream(request, encoded[0], params, on_piece, on_done)

    async def one(text: str, ids: list[int]) -> tuple[PromptLogprobs | None, GenerationResult | None]:
        echo_lp = None
        if req.echo and req.logprobs is not None:
            top_k = req.logprobs
            echo_lp = await svc.call(request, lambda e: e.prompt_logprobs(text, top_k))
        result = await svc.generate(request, ids, params) if req.max_tokens > 0 else None
        return echo_lp, result

    # a list of prompts is submitted at once, so the scheduler can batch them
    outcomes = await asyncio.gather(*(one(t, ids) for t, ids in zip(prompts, encoded, strict=True)))
    choices, n_prompt, n_completion = [], 0, 0
    for i, (text, ids, (echo_lp, result)) in enumerate(zip(prompts, encoded, outcomes, strict=True)):
        out_text = (text if req.echo else "") + (result.text if result else "")
        block = None
        if req.logprobs is not None:
            block = _logprobs_block(engine, echo_lp, result, len(text) if req.echo else 0)
        choices.append(
            {"index": i, "text": out_text, "logprobs": block, "finish_reason": _finish(result) if result else "length"}
        )
        n_prompt += len(ids)
        n_completion += len(result.token_ids) if result else 0
    svc.note(request, n_prompt, n_completion)
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": svc.model_name,
        "choices": choices,
        "usage": openai_usage(n_prompt, n_completion),
    }
