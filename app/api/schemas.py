"""Request and response models, and the one error shape.

Requests refuse unknown fields so a misspelt parameter is an error, not a
silently ignored setting. Numbers are bounded and must be finite.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.clinical.prompting import DEFAULT_ROLE, MAX_ROLE_CHARS, role_problem
from app.clinical.triage.text import is_blank

MAX_QUESTION_CHARS = 4000
MAX_TEXT_CHARS = 20000
DISCLAIMER = (
    "MedAsk output is decision support for clinicians, not a diagnosis or treatment plan. "
    "Verify against clinical judgement and current guidelines."
)

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


# strict: a JSON 0 is not ``false`` and "5" is not 5; the schema says what is accepted
_STRICT = ConfigDict(extra="forbid", strict=True)


def _no_lone_surrogates(value: Any, where: str = "") -> None:
    """JSON may spell an unpaired UTF-16 surrogate ("\\ud800"); no tokenizer or log can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where or 'a string'} contains an unpaired surrogate (invalid Unicode)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_lone_surrogates(k, where)
            _no_lone_surrogates(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_lone_surrogates(v, f"{where}[{i}]")


class _Request(BaseModel):
    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _no_lone_surrogates(data)
        return data


class ErrorBody(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def _clean_question(v: str) -> str:
    v = v.strip()
    if is_blank(v):  # invisible characters alone ("\u200b", "\ufeff") are empty too
        raise ValueError("question must not be empty or only whitespace")
    if len(v) > MAX_QUESTION_CHARS:
        raise ValueError(f"question must be at most {MAX_QUESTION_CHARS} characters after trimming (got {len(v)})")
    if "\x00" in v:
        raise ValueError("question must not contain NUL characters")
    return v


def _clean_role(v: str) -> str:
    v = v.strip() or DEFAULT_ROLE
    problem = role_problem(v)
    if problem:
        raise ValueError(problem)
    return v


class HistoryTurn(BaseModel):
    model_config = _STRICT
    role: Literal["user", "assistant"]
    # a turn is a question or an answer: the question's bound keeps a history within the body limit
    content: str = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS)


class AskRequest(_Request):
    question: str = Field(..., description="the clinical question, 1..4000 characters after trimming")
    role: str = Field(
        DEFAULT_ROLE, description=f"a specialty from /roles or free text up to {MAX_ROLE_CHARS} characters"
    )
    max_new_tokens: int = Field(256, ge=1, le=4096)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stream: bool = False
    evidence: bool | None = Field(
        None, description="retrieve cited evidence into the prompt; default: true when an evidence pack is loaded"
    )
    evidence_k: int | None = Field(None, ge=1, le=10, description="passages to retrieve; default: the trained k")
    grounding: GroundingMode | None = Field(
        None,
        description="strict: every sentence shown is supported by a cited passage ([n]) or withheld; mark: "
        "unsupported sentences shown marked; off: the model's text unchecked. Default: MEDASK_GROUNDING",
    )
    history: list[HistoryTurn] = Field(
        default_factory=list,
        max_length=32,
        description="earlier turns of the conversation, oldest first; the oldest are dropped when the context "
        "is full (the role always stays)",
    )

    _q = field_validator("question")(_clean_question)
    _r = field_validator("role")(_clean_role)

    @property
    def turns(self) -> list[tuple[str, str]]:
        return [(t.role, t.content) for t in self.history]

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "question": "A 58-year-old man has crushing chest pain radiating to the left arm for 40 minutes, "
                    "with sweating. What is the likely diagnosis and the next step?",
                    "role": "Cardiologist",
                    "max_new_tokens": 128,
                }
            ]
        },
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TriageFlag(BaseModel):
    id: str = Field(..., description="rule id in the rule file, e.g. acute_coronary_syndrome")
    name: str
    level: Literal["emergency", "crisis", "urgent"]
    advice: str
    signal: Literal["rules", "classifier"] = Field(
        "rules",
        description="rules: phrase rules and measured findings; classifier: the second, statistical signal "
        "alone raised this level (no rule matched)",
    )


class TriageOut(BaseModel):
    level: Literal["emergency", "crisis", "urgent", "routine"] = Field(
        ..., description="the most severe red flag found in the question by the deterministic rule layer"
    )
    flags: list[TriageFlag]
    rules_version: str
    in_scope: bool = Field(..., description="false: not a medical question; refused without a model call")
    advice: str | None = Field(
        None, description="fixed, rule-owned advice (emergency and crisis): the answer starts with it"
    )
    language: str = Field("en", description="the question's language (en, pt): the advice is written in it")
    findings: dict[str, list[float]] = Field(
        default_factory=dict,
        description="measurements read from the question (spo2, sbp, dbp, hr, rr, temp_c, gcs, glucose_mmol, "
        "ketones, ph, lactate, map, age_days, pregnancy_weeks, minutes)",
    )
    note: str | None = Field(None, description="said in the question's language, e.g. that answers are in English")


GroundingMode = Literal["strict", "mark", "off"]


class GroundingOut(BaseModel):
    mode: GroundingMode = Field(..., description="strict: unsupported sentences withheld; mark: shown marked; off")
    sentences: int = Field(..., description="sentences in the model's text")
    supported: int = Field(..., description="of them, supported by a cited passage (shown with [n])")
    withheld: int = Field(..., description="unsupported sentences not shown (strict)")
    support_rate: float | None = Field(None, description="supported / sentences; null when the model wrote none")
    evidence_sentences: int = Field(0, description="sentences composed from the passages themselves, each with [n]")
    method: str = Field(..., description="what the check can and cannot see")


class QualityOut(BaseModel):
    degenerate: bool = Field(..., description="true: the model's text was a loop, an echo or empty, and is withheld")
    reasons: list[str]
    repetition: float = Field(..., description="share of word trigrams repeating an earlier one (gold answers: <0.1)")
    question_echo: float = Field(..., description="share of the answer's word 4-grams copied from the question")
    words: int
    perplexity_percentile: float | None = Field(
        None,
        description="percentage of this model's greedy answers to the held-out questions with a lower perplexity "
        "(from the checkpoint's manifest); null when the checkpoint has no such reference",
    )


PERPLEXITY_MEANING = (
    "the model's perplexity of its own answer given the prompt: how predictable the text was to the model, "
    "NOT whether it is correct (loops score lowest); see quality.perplexity_percentile and quality.degenerate; "
    "null when no model call was made"
)


class Citation(BaseModel):
    id: str = Field(..., description="passage id in the evidence pack")
    title: str
    source: str
    url: str | None
    score: float = Field(..., description="BM25 score of the passage for role + question")
    snippet: str = Field(..., description="the passage text the model saw (up to about 600 characters)")


class AskResponse(BaseModel):
    id: str
    answer: str = Field(
        ...,
        description="fixed safety advice first (emergency/crisis), then the model's sentences a cited passage "
        "supports (each with its [n]), composed from the passages when too few are (see answer_source, grounding)",
    )
    role: str
    perplexity: float | None = Field(..., description=PERPLEXITY_MEANING)
    perplexity_note: str | None = Field(
        None, description="why perplexity is null although the model answered (an upstream engine that cannot score)"
    )
    usage: Usage
    finish_reason: Literal["stop", "length", "refused"] = Field(
        ..., description="refused: outside medicine, answered by the rule layer without a model call"
    )
    triage: TriageOut
    quality: QualityOut | None = Field(None, description="the answer quality gate; null when no model call was made")
    citations: list[Citation] = Field(
        default_factory=list, description="the evidence in the model's prompt, numbered as the answer cites it"
    )
    answer_source: Literal["model", "evidence", "mixed"] | None = Field(
        None,
        description="model: the model's checked sentences; evidence: composed from the cited passages (the model's "
        "text was not supported); mixed: both; null when no model call was made",
    )
    grounding: GroundingOut | None = Field(None, description="sentence-level support of the answer by its citations")
    model: str
    disclaimer: str
    latency_ms: float


class PerplexityItem(_Request):
    text: str | None = Field(None, description="score this text: unconditionally, or given context")
    context: str | None = Field(
        None,
        description="with text: raw text (no template) the text is scored after, as an lm-eval log-likelihood "
        "request (context, continuation)",
    )
    question: str | None = Field(None, description="with answer: score the answer given the role prompt and question")
    answer: str | None = None
    role: str = DEFAULT_ROLE
    evidence: bool = Field(
        False, description="with question and answer: score the answer with the retrieved evidence in the prompt"
    )

    _r = field_validator("role")(_clean_role)

    @model_validator(mode="after")
    def _one_form(self) -> PerplexityItem:
        if self.text is not None:
            if self.question is not None or self.answer is not None:
                raise ValueError("give either text, or question and answer, not both")
            if self.evidence:
                raise ValueError("evidence goes with question and answer, not text")
            if self.context is not None and (not self.context or len(self.context) > MAX_TEXT_CHARS):
                raise ValueError(f"context must be 1..{MAX_TEXT_CHARS} characters")
            if not self.text.strip():
                raise ValueError("text must not be empty")
            if len(self.text) > MAX_TEXT_CHARS:
                raise ValueError(f"text must be at most {MAX_TEXT_CHARS} characters")
        else:
            if self.question is None or self.answer is None:
                raise ValueError("give text, or both question and answer")
            if self.context is not None:
                raise ValueError("context goes with text; question and answer use the role template")
            self.question = _clean_question(self.question)
            if not self.answer.strip():
                raise ValueError("answer must not be empty")
            if len(self.answer) > MAX_TEXT_CHARS:
                raise ValueError(f"answer must be at most {MAX_TEXT_CHARS} characters")
        return self


class PerplexityRequest(_Request):
    text: str | None = None
    context: str | None = None
    question: str | None = None
    answer: str | None = None
    role: str | None = None
    evidence: bool | None = Field(None, description="single form: score the answer with the retrieved evidence")
    items: list[PerplexityItem] | None = Field(None, min_length=1, max_length=256, description="a batch of items")
    token_logprobs: bool = Field(False, description="include per-token log-probabilities")

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "question": "A 7-year-old has a red, bulging tympanic membrane and fever. Diagnosis?",
                    "answer": "Acute otitis media; treat with amoxicillin and analgesia.",
                    "role": "Pediatrician",
                },
                {"items": [{"text": "Hypertension is a major risk factor for stroke."}], "token_logprobs": True},
            ]
        },
    )

    @model_validator(mode="after")
    def _single_or_batch(self) -> PerplexityRequest:
        single = any(
            v is not None for v in (self.text, self.context, self.question, self.answer, self.role, self.evidence)
        )
        if self.items is not None and single:
            raise ValueError("give items, or one item's fields, not both")
        if self.items is None:
            if not single:
                raise ValueError("give text, question and answer, or items")
            self.items = [
                PerplexityItem(
                    text=self.text,
                    context=self.context,
                    question=self.question,
                    answer=self.answer,
                    role=self.role or DEFAULT_ROLE,
                    evidence=bool(self.evidence),
                )
            ]
        return self


class PerplexityResult(BaseModel):
    perplexity: float
    word_perplexity: float
    bits_per_byte: float
    tokens: int
    mean_logprob: float
    token_logprobs: list[float] | None = None


class PerplexityResponse(BaseModel):
    model: str
    results: list[PerplexityResult]


# ---- OpenAI-compatible ------------------------------------------------------

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
    model_config = _STRICT
    include_usage: bool = Field(False, description="send a last chunk with `usage` and empty `choices`")


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
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


class _OpenAIRequest(_Request):
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
