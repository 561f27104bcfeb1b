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

from app.api.openai_schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Chunk,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    chat_choice,
    openai_usage,
    text_choice,
)
from app.api.routes import ERRORS, STREAMED, ServingDep, open_door, remember
from app.api.schemas import MAX_QUESTION_CHARS
from app.api.streaming import DONE, Runner, fixed_events, new_id, sse
from app.clinical.clinic import Consult
from app.clinical.prompting import DEFAULT_ROLE, Turn, role_problem
from app.engine.base import EngineBase, GenerationResult, PromptLogprobs, SamplingParams
from app.errors import ApiError
from app.serving import Serving

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


def check_model(svc: Serving, name: str | None) -> None:
    """An OpenAI ``model`` must name the served model (or one of its aliases): a client that asks
    for another model must not silently get this one."""
    if name is None or name == svc.model_name or name in svc.settings.alias_list:
        return
    raise ApiError(
        404,
        "model_not_found",
        f"the model {name!r} does not exist here; this server serves {svc.model_name!r} (GET /v1/models)",
        "model",
        code="model_not_found",
    )


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
    check_model(svc, model_id)
    return ModelCard(id=model_id)


def _check_n(svc: Serving, runner: Runner, n: int, stream: bool, rows: int = 1) -> None:
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
    if rows * n > runner.queue_share:
        raise ApiError(
            400,
            "invalid_request_error",
            f"prompts x n = {rows * n} exceeds one caller's share of the queue ({runner.queue_share}); split the request",
            "prompt",
        )


def _seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n rows of one request: with a seed, row i samples with seed + i (reproducible, not identical)."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


class _Stream:
    """One OpenAI stream's chunks: they share an id, a time and a model; the end is the finish chunk,
    with ``stream_options.include_usage`` a usage chunk with no choices (OpenAI's contract), then [DONE];
    without it the finish chunk carries usage."""

    def __init__(self, obj: str, cid: str, model: str, include_usage: bool) -> None:
        self.obj, self.cid, self.model, self.include_usage = obj, cid, model, include_usage
        self.created = int(time.time())
        self.started = False  # a chat's first chunk says who speaks

    def chunk(self, choices: list[Any], **extra: Any) -> Chunk:
        return Chunk(id=self.cid, object=self.obj, created=self.created, model=self.model, choices=choices, **extra)

    def say(self, content: str) -> str:
        first, self.started = not self.started, True
        return sse(self.chunk([chat_choice(content, first=first)]))

    def closing(self, last: Chunk, usage: dict[str, Any]) -> list[str]:
        if self.include_usage:
            return [sse(last), sse(self.chunk([], usage=usage)), DONE]
        last.usage = usage
        return [sse(last), DONE]


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
    ready, runner = open_door(svc, request)
    check_model(svc, req.model)
    _check_n(svc, runner, req.n, req.stream)
    role, history, question = conversation(req.messages)
    plan = await ready.clinic.prepare(Consult(question, role, history, req.max_new_tokens, req.max_new_param))
    runner.note(request, 0, 0, question=question, role=role)
    out = _Stream("chat.completion.chunk", new_id("chatcmpl"), svc.model_name, req.include_usage)
    triage = plan.triage.public()
    if plan.refused:
        refusal = ready.clinic.deliver(plan, None)
        remember(svc, out.cid, "chat", plan, refusal)
        content = refusal.text
        runner.note(request, 0, 0, answer=content)
        extra: dict[str, Any] = {"triage": triage, "quality": None, "citations": []}
        if req.stream:
            last = out.chunk([chat_choice(finish="content_filter")], **extra)
            return fixed_events([out.say(content), *out.closing(last, openai_usage(0, 0))])
        choices = [_message(i, content, "content_filter", None) for i in range(req.n)]
        return ChatCompletionResponse(
            id=out.cid, created=out.created, model=out.model, choices=choices, usage=openai_usage(0, 0), **extra
        )
    params = req.to_sampling_params(plan.max_new_tokens)
    if req.stream:
        answer = ready.clinic.stream(plan)  # sentences leave once complete and checked

        def on_done(result: GenerationResult) -> list[str]:
            tail, delivered = answer.close(result)
            remember(svc, out.cid, "chat", plan, delivered)
            runner.note(request, 0, 0, answer=delivered.text)
            assert delivered.quality is not None and delivered.grounding is not None
            last = out.chunk(
                [chat_choice(finish=result.finish)],
                triage=triage,
                quality=delivered.quality.public(),
                citations=plan.citations(),
                answer_source=delivered.grounding.answer_source,
                grounding=delivered.grounding.public(),
            )
            usage = openai_usage(result.prompt_tokens, result.completion_tokens)
            return [*([out.say(tail)] if tail else []), *out.closing(last, usage)]

        return runner.stream(
            request,
            plan.prompt,
            params,
            on_piece=lambda piece: out.say(text) if (text := answer.feed(piece)) else "",
            on_done=on_done,
            preamble=[out.say(answer.advice)] if answer.advice else [],
        )
    results = await asyncio.gather(*(runner.generate(request, plan.prompt, p) for p in _seeded(params, req.n)))
    answers = [ready.clinic.deliver(plan, result) for result in results]
    remember(svc, out.cid, "chat", plan, answers[0])  # the first choice is the one a page shows
    choices = [
        _message(i, a.text, r.finish, a.quality.public() if a.quality else None)
        for i, (a, r) in enumerate(zip(answers, results, strict=True))
    ]
    completion = sum(r.completion_tokens for r in results)
    runner.note(request, results[0].prompt_tokens, completion, answer=answers[0].text)
    first = answers[0]
    return ChatCompletionResponse(
        id=out.cid,
        created=out.created,
        model=out.model,
        choices=choices,
        usage=openai_usage(results[0].prompt_tokens, completion),
        triage=triage,
        quality=first.quality.public() if first.quality else None,
        citations=plan.citations(),
        answer_source=first.grounding.answer_source if first.grounding else None,
        grounding=first.grounding.public() if first.grounding else None,
    )


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
    ready, runner = open_door(svc, request)
    engine = ready.engine
    check_model(svc, req.model)
    prompts = req.prompts
    _check_n(svc, runner, req.n, req.stream, len(prompts))
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
        ready.clinic.check_context(len(ids), req.max_tokens, "max_tokens")
        encoded.append(ids)
    out = _Stream("text_completion", new_id("cmpl"), svc.model_name, req.include_usage)
    params = req.to_sampling_params()

    if req.stream:

        def on_done(result: GenerationResult) -> list[str]:
            runner.note(request, 0, 0, answer=result.text)
            usage = openai_usage(result.prompt_tokens, _completion_tokens(result))
            return out.closing(out.chunk([text_choice("", result.finish)]), usage)

        return runner.stream(request, encoded[0], params, lambda piece: sse(out.chunk([text_choice(piece)])), on_done)

    async def one(ids: list[int]) -> tuple[PromptLogprobs | None, list[GenerationResult | None]]:
        echo_lp = None
        if req.echo and req.logprobs is not None:
            echo_lp = await runner.call(request, lambda e: e.prompt_logprobs(ids, params.top_logprobs))
        if req.max_tokens == 0:
            return echo_lp, [None] * req.n
        results = await asyncio.gather(*(runner.generate(request, ids, p) for p in _seeded(params, req.n)))
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
    runner.note(request, n_prompt, n_completion)
    usage = openai_usage(n_prompt, n_completion)
    return CompletionResponse(id=out.cid, created=out.created, model=out.model, choices=choices, usage=usage)
