"""OpenAI-compatible request and response models (chat and completions), their stream chunks, and the
fields OpenAI defines that this service refuses by name rather than ignoring."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.api.schemas import (
    MAX_TEXT_CHARS,
    STRICT,
    BaseRequest,
    Citation,
    GroundingOut,
    QualityOut,
    Seed,
    Temperature,
    TopP,
    TriageOut,
    Usage,
)
from app.engine.base import SamplingParams

Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MAX_STOPS = 4
MAX_HISTORY_TURNS = 64

# Fields OpenAI defines that this service does not implement: named in a 400, never ignored
UNSUPPORTED_CHAT = (
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "store",
    "metadata",
    "service_tier",
    "reasoning_effort",
    "web_search_options",
    "verbosity",
)
UNSUPPORTED_COMPLETION = ("best_of", "logit_bias", "suffix")


class UnsupportedParameter(Exception):
    """A field OpenAI defines that this service does not implement (a 400 naming it).

    Not a ValueError, so pydantic lets it through to the route's error handler."""

    def __init__(self, field: str):
        super().__init__(f"{field!r} is an OpenAI parameter this service does not implement; remove it")
        self.field = field


def _refuse_unsupported(data: Any, fields: tuple[str, ...]) -> None:
    if isinstance(data, dict):
        for name in fields:
            if name in data:
                raise UnsupportedParameter(name)


def _clean_stop(v: str | list[str] | None) -> tuple[str, ...]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences")
    for s in stops:
        if not s:
            raise ValueError("a stop sequence must not be empty")
        if len(s) > 256:
            raise ValueError("a stop sequence must be at most 256 characters")
    return tuple(stops)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = Field(False, description="send a last chunk with `usage` and empty `choices`")


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"] = Field(
        ..., description="developer is treated as system: the role the answer is given in"
    )
    content: str | list[TextPart] = Field(..., description="text, or a list of text parts (joined)")
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @model_validator(mode="after")
    def _bounded(self) -> ChatMessage:
        if len(self.text) > MAX_TEXT_CHARS:
            raise ValueError(f"content must be at most {MAX_TEXT_CHARS} characters")
        return self


class _OpenAIRequest(BaseRequest):
    """Sampling fields both OpenAI routes share, with OpenAI's bounds."""

    model: str | None = Field(None, description="the served model's id or one of its aliases; unknown ids are a 404")
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"up to {MAX_STOPS} strings; generation ends before the first (finish_reason stop)"
    )
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    n: int = Field(1, ge=1, le=16, description="choices per prompt, up to the server's MEDASK_MAX_N")
    user: str | None = Field(None, max_length=256)

    _stop = field_validator("stop")(_clean_stop)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _OpenAIRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return self.stop if isinstance(self.stop, tuple) else _clean_stop(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_new_tokens: int, **extra: Any) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stops,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            **extra,
        )


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_HISTORY_TURNS)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "model": "medask-default",
                    "messages": [
                        {"role": "system", "content": "Neurologist"},
                        {"role": "user", "content": "Sudden worst headache of life with neck stiffness: next step?"},
                    ],
                    "max_tokens": 96,
                }
            ]
        },
    )

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        _refuse_unsupported(data, UNSUPPORTED_CHAT)
        return data

    @property
    def max_new_tokens(self) -> int | None:
        """The answer's length limit: ``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``;
        None: the server's default."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_new_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def to_sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return self._sampling(max_new_tokens)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="raw text (no role template) or token ids; a list is a batch"
    )
    max_tokens: int = Field(16, ge=0, le=4096)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    ignore_eos: bool = Field(
        False, description="vLLM's extension for benchmarks: generate max_tokens even past end-of-sequence"
    )

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"prompt": "Hypertension is", "max_tokens": 0, "echo": True, "logprobs": 1}]},
    )

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        _refuse_unsupported(data, UNSUPPORTED_COMPLETION)
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt_bounds(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], int):
            prompts: list[Any] = [v]
        else:
            prompts = [v] if isinstance(v, str) else list(v)
        if not prompts or len(prompts) > 64:
            raise ValueError("prompt must be a string, a list of 1..64 strings, token ids, or a list of 1..64 of those")
        for p in prompts:
            if not p:
                raise ValueError("prompt must not be empty")
            if len(p) > MAX_TEXT_CHARS:
                raise ValueError(f"prompt must be at most {MAX_TEXT_CHARS} characters (or token ids)")
            if isinstance(p, list) and any(t < 0 for t in p):
                raise ValueError("token ids must not be negative")
        return v

    def to_sampling_params(self) -> SamplingParams:
        """max_tokens=0 (scoring the prompt only) still runs as one token; ``logprobs`` is top-k."""
        return self._sampling(
            max(self.max_tokens, 1),
            top_logprobs=self.logprobs or 0,
            ignore_eos=self.ignore_eos,
        )

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "medask"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"]
    logprobs: None = None
    quality: QualityOut | None = Field(None, description="the quality gate on this choice's text")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    triage: TriageOut = Field(..., description="the red-flag triage of every user turn")
    quality: QualityOut | None = Field(None, description="the quality gate on the first choice")
    citations: list[Citation] = Field(default_factory=list, description="the evidence in the prompt")
    answer_source: Literal["model", "evidence", "mixed"] | None = Field(None, description="as in /ask (first choice)")
    grounding: GroundingOut | None = Field(None, description="as in /ask (first choice)")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- stream chunks: dumped with only the fields set, as OpenAI writes them ----------------------


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class TextChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Chunk(BaseModel):
    """One streamed chunk of either route; the finish chunk of a chat carries MedAsk's fields."""

    id: str
    object: Literal["chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[ChatChunkChoice] | list[TextChunkChoice]
    usage: dict[str, Any] | None = None
    triage: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    citations: list[dict[str, Any]] | None = None
    answer_source: str | None = None
    grounding: dict[str, Any] | None = None


def chat_choice(content: str | None = None, first: bool = False, finish: str | None = None) -> ChatChunkChoice:
    """A chat chunk's one choice: text (the first says who speaks), or the finish with no text."""
    delta = ChatDelta() if content is None else ChatDelta(content=content)
    if first:
        delta.role = "assistant"
    return ChatChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=None)


def text_choice(text: str, finish: str | None = None) -> TextChunkChoice:
    return TextChunkChoice(index=0, text=text, finish_reason=finish, logprobs=None)
