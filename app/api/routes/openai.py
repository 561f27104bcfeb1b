"""OpenAI-compatible endpoints, so the openai SDK and lm-evaluation-harness
(`local-completions`, `local-chat-completions`) work unchanged.

Chat: the system (or developer) message is the role ("Cardiologist" or "act as
a Cardiologist"), the last user message is the question, and the turns before
it are the conversation, all rendered by app.clinical.prompting like /ask. Completions:
raw text or token ids, no template; ``echo`` + ``logprobs`` scores the prompt
(log-likelihood requests), and a generation that ends on end-of-sequence reports
that token's entry, as vLLM does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any

from fastapi import APIRouter, Request

from app.api.routes import ERRORS, STREAMED, ServingDep
from app.api.schemas import (
    MAX_QUESTION_CHARS,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    openai_usage,
)
from app.clinical.prompting import DEFAULT_ROLE, Turn, role_problem
from app.engine.local import EngineBase, GenerationResult, PromptLogprobs, SamplingParams
from app.errors import ApiError
from app.serving import Serving, new_id, sse

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


def conversation(messages: list[ChatMessage]) -> tuple[str, list[Turn], str]:
    """(role, earlier turns, question) of a chat: one system/developer message (the role), then
    user and assistant turns ending with the user's question."""
    system = [m for m in messages if m.role in ("system", "developer")]
    if len(system) > 1:
        raise ApiError(
            400, "invalid_request_error", "give at most one system (or developer) message: it sets the role", "messages"
        )
    turns: list[Turn] = [(m.role, m.text) for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise ApiError(400, "invalid_request_error", "the last message must be a non-empty user message", "messages")
    question = turns[-1][1].strip()
    if len(question) > MAX_QUESTION_CHARS:
        raise ApiError(
            400,
            "invalid_request_error",
            f"the user message must be at most {MAX_QUESTION_CHARS} characters",
            "messages",
        )
    return role_from_system(system[0].text if system else None), turns[:-1], question


@router.get("/models", response_model=ModelList, summary="The one served model")
async def models(svc: ServingDep) -> ModelList:
    svc.require_ready()
    return ModelList(data=[ModelCard(id=svc.model_name)])


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    summary="The served model by id (or an alias)",
    responses={404: {"description": "model_not_found"}},
)
async def model(model_id: str, svc: ServingDep) -> ModelCard:
    svc.require_ready()
    svc.check_model(model_id)
    return ModelCard(id=model_id)


def _check_n(svc: Serving, n: int, stream: bool, rows: int = 1) -> None:
    limit = svc.settings.max_n
    if n > limit:
        raise ApiError(400, "invalid_request_error", f"n must be at most {limit} on this server (MEDASK_MAX_N)", "n")
    if stream and n > 1:
        raise ApiError(400, "invalid_request_error", "stream supports n=1; ask without stream for more choices", "n")
    if rows > svc.settings.max_prompts_per_request:
        raise ApiError(
            400,
            "invalid_request_error",
            f"at most {svc.settings.max_prompts_per_request} prompts per request on this server "
            "(MEDASK_MAX_PROMPTS_PER_REQUEST); split the batch",
            "prompt",
        )
    share = svc.require_ready()[1].policy.key_limit
    if rows * n > share:
        raise ApiError(
            400,
            "invalid_request_error",
            f"prompts x n = {rows * n} exceeds one caller's share of the queue ({share}); split the request",
            "prompt",
        )


def _seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n rows of one request: with a seed, row i samples with seed + i (reproducible, not identical)."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def _chunk(
    cid: str, created: int, model: str, obj: str, choices: list[dict[str, Any]], usage: Any = None
) -> dict[str, Any]:
    out = {"id": cid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def _closing(
    cid: str, created: int, model: str, obj: str, last: dict[str, Any], usage: dict[str, Any], include_usage: bool
) -> list[str]:
    """The end of an OpenAI stream: the finish chunk, with ``stream_options.include_usage`` a usage
    chunk with no choices (OpenAI's contract), then [DONE]. Without it the finish chunk carries usage."""
    if include_usage:
        return [sse(last), sse(_chunk(cid, created, model, obj, [], usage)), "data: [DONE]\n\n"]
    return [sse({**last, "usage": usage}), "data: [DONE]\n\n"]


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERRORS, 200: STREAMED, 404: {"description": "model_not_found"}},
    summary="OpenAI chat completions (system or developer message = role; earlier turns are the conversation)",
    description="Beside OpenAI's fields the response carries `triage` (the deterministic red-flag layer over every "
    "user turn: level, flags, rules_version, in_scope, advice), `quality` (the answer quality gate, also per choice) "
    "and `citations` (the evidence in the prompt); streams carry them in the finish chunk. Emergency and crisis "
    "advice opens the message content (the first streamed chunk). A question outside medicine is refused without a "
    "model call (`finish_reason: content_filter`). The conversation goes through the checkpoint's chat template; "
    "when it is longer than the context the oldest turns are dropped, never the role.",
)
async def chat(req: ChatCompletionRequest, request: Request, svc: ServingDep) -> Any:  # a response or a stream
    engine, _ = svc.require_ready()
    svc.check_model(req.model)
    _check_n(svc, req.n, req.stream)
    role, history, question = conversation(req.messages)
    triage = await svc.triage_conversation(history, question)
    cid, created, model = new_id("chatcmpl"), int(time.time()), svc.model_name
    obj = "chat.completion.chunk"
    if not triage.in_scope:
        content = svc.refusal(triage)
        svc.note(request, 0, 0, question=question, role=role, answer=content)
        extra = {"triage": triage.public(), "quality": None, "citations": []}
        if req.stream:
            first = _chunk(cid, created, model, obj, [_delta(0, {"role": "assistant", "content": content})])
            last = {**_chunk(cid, created, model, obj, [_delta(0, {}, "content_filter")]), **extra}
            return svc.events(
                [sse(first), *_closing(cid, created, model, obj, last, openai_usage(0, 0), req.include_usage)]
            )
        choices = [_message(i, content, "content_filter", None) for i in range(req.n)]
        return ChatCompletionResponse(
            id=cid, created=created, model=model, choices=choices, usage=openai_usage(0, 0), **extra
        )
    max_new = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if max_new is None:
        bare = len(engine.encode_question(question, role))
        max_new = max(1, min(svc.settings.max_new_tokens_default, engine.context_length - bare))
    prompt, passages = svc.prompt(question, role, max_new, param, history=history)
    citations = [p.citation() for p in passages]
    params = SamplingParams(
        max_new, req.temperature, req.top_p, req.seed, req.stops, req.frequency_penalty, req.presence_penalty
    )

    if req.stream:
        first = {"sent": False}

        def delta(content: str) -> dict[str, Any]:
            out = {"content": content} if first["sent"] else {"role": "assistant", "content": content}
            first["sent"] = True
            return _delta(0, out)

        gate = svc.gate(question, passages)  # sentences leave once complete and checked

        def on_piece(piece: str) -> str:
            text = gate.feed(piece)
            return sse(_chunk(cid, created, model, obj, [delta(text)])) if text else ""

        def on_done(result: GenerationResult) -> list[str]:
            tail, content, quality, grounding = svc.finish_stream(gate, result, question, triage)
            events = [sse(_chunk(cid, created, model, obj, [delta(tail)]))] if tail else []
            last = _chunk(cid, created, model, obj, [_delta(0, {}, result.finish)])
            last.update(
                {
                    "triage": triage.public(),
                    "quality": quality.public(),
                    "citations": citations,
                    "answer_source": grounding.answer_source,
                    "grounding": grounding.public(),
                }
            )
            svc.note(request, 0, 0, answer=content)
            usage = openai_usage(result.prompt_tokens, result.completion_tokens)
            return [*events, *_closing(cid, created, model, obj, last, usage, req.include_usage)]

        preamble = [sse(_chunk(cid, created, model, obj, [delta(triage.prefix + "\n\n")]))] if triage.prefix else []
        return svc.stream(
            request, prompt, params, on_piece, on_done, audit={"question": question, "role": role}, preamble=preamble
        )
    results = await asyncio.gather(*(svc.generate(request, prompt, p) for p in _seeded(params, req.n)))
    choices, qualities, groundings = [], [], []
    for i, result in enumerate(results):
        content, quality, grounding = svc.answer(result, question, triage, passages)
        choices.append(_message(i, content, result.finish, quality.public()))
        qualities.append(quality.public())
        groundings.append(grounding)
    completion = sum(r.completion_tokens for r in results)
    svc.note(
        request,
        results[0].prompt_tokens,
        completion,
        question=question,
        role=role,
        answer=choices[0].message.content,
    )
    usage = openai_usage(results[0].prompt_tokens, completion)
    return ChatCompletionResponse(
        id=cid,
        created=created,
        model=model,
        choices=choices,
        usage=usage,
        triage=triage.public(),
        quality=qualities[0],
        citations=citations,
        answer_source=groundings[0].answer_source,
        grounding=groundings[0].public(),
    )


def _delta(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}


def _message(index: int, content: str, finish: str, quality: dict[str, Any] | None) -> ChatChoice:
    return ChatChoice.model_validate(
        {"index": index, "message": {"content": content}, "finish_reason": finish, "quality": quality}
    )


def _logprobs_block(
    engine: EngineBase, echo: PromptLogprobs | None, result: GenerationResult | None, offset0: int
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
        pieces = result.pieces if result.pieces is not None else [engine.front.decode([t]) for t in result.token_ids]
        for i, (piece, lp) in enumerate(zip(pieces, result.logprobs, strict=True)):
            tokens.append(piece)
            lps.append(lp)
            tops.append(result.top[i] if result.top else {piece: lp})
            offsets.append(pos)
            pos += len(piece)
        if result.eos is not None:  # the end-of-sequence token: no text, but a real prediction
            lp, top = result.eos
            tokens.append("")
            lps.append(lp)
            tops.append(top or {"": lp})
            offsets.append(pos)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _completion_tokens(result: GenerationResult | None) -> int:
    """Generated tokens, the end-of-sequence token included (vLLM and OpenAI count it)."""
    if result is None:
        return 0
    return result.completion_tokens + (result.eos is not None)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**ERRORS, 200: STREAMED, 404: {"description": "model_not_found"}},
    summary="OpenAI completions: raw text or token ids; echo + logprobs (+ max_tokens=0) scores the prompt",
)
async def completions(req: CompletionRequest, request: Request, svc: ServingDep) -> Any:
    engine, _ = svc.require_ready()
    svc.check_model(req.model)
    prompts = req.prompts
    _check_n(svc, req.n, req.stream, len(prompts))
    if req.stream and len(prompts) > 1:
        raise ApiError(400, "invalid_request_error", "stream supports a single prompt", "prompt")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "invalid_request_error", "max_tokens=0 needs echo=true (score the prompt)", "max_tokens")
    vocab = engine.vocab_size
    encoded: list[list[int]] = []
    texts: list[str] = []
    for p in prompts:
        if isinstance(p, str):
            ids = engine.encode(p)
            texts.append(p)
        else:
            if max(p) >= vocab:
                raise ApiError(
                    400,
                    "invalid_request_error",
                    f"token id {max(p)} is outside the vocabulary (size {vocab})",
                    "prompt",
                )
            ids = list(p)
            texts.append(engine.front.decode(ids))
        if not ids:
            raise ApiError(400, "invalid_request_error", "prompt encodes to no tokens", "prompt")
        svc.check_context(len(ids), req.max_tokens, "max_tokens")
        encoded.append(ids)
    cid, created, model, obj = new_id("cmpl"), int(time.time()), svc.model_name, "text_completion"
    top_k = req.logprobs or 0
    params = SamplingParams(
        max(req.max_tokens, 1),
        req.temperature,
        req.top_p,
        req.seed,
        req.stops,
        req.frequency_penalty,
        req.presence_penalty,
        top_k if req.logprobs is not None else 0,
        req.ignore_eos,
    )

    if req.stream:

        def on_piece(piece: str) -> str:
            return sse(_chunk(cid, created, model, obj, [_text(0, piece, None)]))

        def on_done(result: GenerationResult) -> list[str]:
            svc.note(request, 0, 0, answer=result.text)
            usage = openai_usage(result.prompt_tokens, _completion_tokens(result))
            last = _chunk(cid, created, model, obj, [_text(0, "", result.finish)])
            return _closing(cid, created, model, obj, last, usage, req.include_usage)

        return svc.stream(request, encoded[0], params, on_piece, on_done)

    async def one(ids: list[int]) -> tuple[PromptLogprobs | None, list[GenerationResult | None]]:
        echo_lp = None
        if req.echo and req.logprobs is not None:
            echo_lp = await svc.call(request, lambda e: e.prompt_logprobs(ids, top_k))
        if req.max_tokens == 0:
            return echo_lp, [None] * req.n
        results = await asyncio.gather(*(svc.generate(request, ids, p) for p in _seeded(params, req.n)))
        return echo_lp, list(results)

    # every prompt is submitted at once, so the scheduler can batch them
    outcomes = await asyncio.gather(*(one(ids) for ids in encoded))
    choices: list[CompletionChoice] = []
    n_prompt = n_completion = 0
    for text, ids, (echo_lp, results) in zip(texts, encoded, outcomes, strict=True):
        for result in results:
            block = None
            if req.logprobs is not None:
                block = _logprobs_block(engine, echo_lp, result, len(text) if req.echo else 0)
            choices.append(
                CompletionChoice.model_validate(
                    {
                        "index": len(choices),
                        "text": (text if req.echo else "") + (result.text if result else ""),
                        "finish_reason": result.finish if result else "length",
                        "logprobs": block,
                    }
                )
            )
            n_completion += _completion_tokens(result)
        n_prompt += len(ids)
    svc.note(request, n_prompt, n_completion)
    usage = openai_usage(n_prompt, n_completion)
    return CompletionResponse(id=cid, created=created, model=model, choices=choices, usage=usage)


def _text(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
