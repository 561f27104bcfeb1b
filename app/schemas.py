"""Request and response models, and the one error shape.

Requests refuse unknown fields so a misspelt parameter is an error, not a
silently ignored setting. Numbers are bounded and must be finite.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.prompting import DEFAULT_ROLE, MAX_ROLE_CHARS, role_problem

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
    if not v:
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

    _q = field_validator("question")(_clean_question)
    _r = field_validator("role")(_clean_role)

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
        description="fixed safety advice first (emergency/crisis), then the model's answer, or a plain statement "
        "that no reliable answer was produced",
    )
    role: str
    perplexity: float | None = Field(..., description=PERPLEXITY_MEANING)
    usage: Usage
    finish_reason: Literal["stop", "length", "refused"] = Field(
        ..., description="refused: outside medicine, answered by the rule layer without a model call"
    )
    triage: TriageOut
    quality: QualityOut | None = Field(None, description="the answer quality gate; null when no model call was made")
    citations: list[Citation] = Field(
        default_factory=list, description="the evidence in the model's prompt, numbered as the answer cites it"
    )
    model: str
    disclaimer: str
    latency_ms: float


class PerplexityItem(_Request):
    text: str | None = Field(None, description="score this text unconditionally")
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
            if not self.text.strip():
                raise ValueError("text must not be empty")
            if len(self.text) > MAX_TEXT_CHARS:
                raise ValueError(f"text must be at most {MAX_TEXT_CHARS} characters")
        else:
            if self.question is None or self.answer is None:
                raise ValueError("give text, or both question and answer")
            self.question = _clean_question(self.question)
            if not self.answer.strip():
                raise ValueError("answer must not be empty")
            if len(self.answer) > MAX_TEXT_CHARS:
                raise ValueError(f"answer must be at most {MAX_TEXT_CHARS} characters")
        return self


class PerplexityRequest(_Request):
    text: str | None = None
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
        single = any(v is not None for v in (self.text, self.question, self.answer, self.role, self.evidence))
        if self.items is not None and single:
            raise ValueError("give items, or one item's fields, not both")
        if self.items is None:
            if not single:
                raise ValueError("give text, question and answer, or items")
            self.items = [
                PerplexityItem(
                    text=self.text,
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


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_TEXT_CHARS)
    name: str | None = None


class ChatCompletionRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = Field(None, max_length=256)

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


class CompletionRequest(_Request):
    model: str | None = None
    prompt: str | list[str] = Field(..., description="raw text (no role template); a list is a batch")
    max_tokens: int = Field(16, ge=0, le=4096)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=256)

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"prompt": "Hypertension is", "max_tokens": 0, "echo": True, "logprobs": 1}]},
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_bounds(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts or len(prompts) > 64:
            raise ValueError("prompt must be a string or a list of 1..64 strings")
        for p in prompts:
            if not p:
                raise ValueError("prompt must not be empty")
            if len(p) > MAX_TEXT_CHARS:
                raise ValueError(f"prompt must be at most {MAX_TEXT_CHARS} characters")
        return v


def openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
