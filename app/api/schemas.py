"""Request and response models, and the one error shape.

Requests refuse unknown fields so a misspelt parameter is an error, not a
silently ignored setting. Numbers are bounded and must be finite.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.clinical.prompting import DEFAULT_ROLE, MAX_ROLE_CHARS, role_problem
from app.clinical.triage.text import is_blank
from app.engine.base import SamplingParams

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
STRICT = ConfigDict(extra="forbid", strict=True)


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


class BaseRequest(BaseModel):
    model_config = STRICT

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
    model_config = STRICT
    role: Literal["user", "assistant"]
    # a turn is a question or an answer: the question's bound keeps a history within the body limit
    content: str = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS)


class AskRequest(BaseRequest):
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

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )

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


class PerplexityItem(BaseRequest):
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


class PerplexityRequest(BaseRequest):
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
