"""The clinical trip, written once: a question becomes a ``Plan`` (``prepare``), and a generation
becomes the delivered ``Answer`` (``deliver``, or ``stream`` for the same answer sentence by sentence).

    prepare:  bound the conversation -> triage every user turn (off the event loop) -> refused here
              when out of scope -> evidence for role + question -> the prompt that fits the context
    deliver:  quality gate -> grounding (supported sentences with [n], else what the sources say)
              -> the rule-owned advice first

Every route that answers a clinical question (``/ask`` and chat, plain and streamed) goes through
it, so a new step is added here and nowhere else. No FastAPI: routes parse, call, and render.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.clinical.evidence import DEFAULT_K, DEFAULT_MAX_TOKENS, EvidencePack, Passage, gather
from app.clinical.grounding import Checker, Grounding, Mode, SentenceGate, ground
from app.clinical.prompting import Turn, fit_history
from app.clinical.quality import Quality, assess, withheld
from app.clinical.safety import SafetyLayer, Triage, compose
from app.engine.base import EngineBase, GenerationResult
from app.errors import ApiError
from app.manifest import ServingContract
from app.metrics import Metrics
from app.settings import Settings

# evidence lines whose token counts are kept (a few hundred bytes each)
EVIDENCE_COUNTS_KEPT = 4096

# tokens the evidence frame adds around the block ("\n\nQuestion: "), kept out of the block's budget
EVIDENCE_FRAME_TOKENS = 16


@dataclass(frozen=True)
class Consult:
    """A clinical question as every route gives it: who asks (role), what, and what came before."""

    question: str
    role: str
    history: Sequence[Turn] = ()
    max_new_tokens: int | None = None  # None: the server's default, within the context
    param: str = "max_new_tokens"  # the request field that sets it, named in a context error
    evidence: bool | None = None  # None: when a pack is loaded
    evidence_k: int | None = None
    grounding: Mode | None = None  # None: MEDASK_GROUNDING


@dataclass
class Plan:
    """What ``prepare`` decided: the triage, and (in scope) the evidence and the prompt."""

    consult: Consult
    triage: Triage
    mode: Mode
    max_new_tokens: int = 0
    prompt: list[int] = field(default_factory=list)
    passages: list[Passage] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        """Out of scope: the rule layer is sure, and no model is called."""
        return not self.triage.in_scope

    def citations(self) -> list[dict]:
        return [p.citation() for p in self.passages]


@dataclass
class Answer:
    """What a client is given: the text (advice first) and how it was made."""

    text: str
    quality: Quality | None = None  # None: refused, no model text
    grounding: Grounding | None = None
    perplexity: float | None = None
    perplexity_note: str | None = None


class Clinic:
    """The trip's steps over one loaded engine, rule file and evidence pack."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        engine: EngineBase,
        safety: SafetyLayer,
        evidence: EvidencePack | None,
        evidence_note: str,
        contract: ServingContract,
    ) -> None:
        self.settings, self.metrics, self.engine, self.safety = settings, metrics, engine, safety
        self.evidence, self.evidence_note, self.contract = evidence, evidence_note, contract
        # token counts of evidence lines (passage text from the pack, never a question): the same passages
        # recur across questions, and counting them was a third of the evidence block's time
        self._evidence_tokens = functools.lru_cache(maxsize=EVIDENCE_COUNTS_KEPT)(engine.count_tokens)

    # ---- prepare ------------------------------------------------------------------
    async def prepare(self, consult: Consult) -> Plan:
        triage = await self.triage_conversation(consult.history, consult.question)
        plan = Plan(consult, triage, consult.grounding or self.settings.grounding)  # type: ignore[arg-type]
        if plan.refused:
            return plan
        bare = self.engine.encode_question(consult.question, consult.role)  # role + question, encoded once
        plan.max_new_tokens = self._max_new(consult, len(bare))
        plan.prompt, plan.passages = self._prompt(consult, bare, plan.max_new_tokens)
        return plan

    async def triage_conversation(self, history: Sequence[Turn], question: str) -> Triage:
        """Every user turn is triaged: an emergency said earlier in a conversation is still one. The
        conversation is bounded first (before any work), and triage runs off the event loop, so one long
        conversation never stalls other requests or the probes."""
        text = "\n".join([t for speaker, t in history if speaker == "user"] + [question])
        limit = self.settings.max_conversation_chars
        if len(text) > limit:
            raise ApiError(
                413,
                "conversation_too_long",
                f"the conversation's user text is {len(text)} characters, more than {limit} "
                "(MEDASK_MAX_CONVERSATION_CHARS): start a new conversation or shorten it",
                "messages" if history else "question",
            )
        return await asyncio.to_thread(self.triage, text)

    def triage(self, text: str) -> Triage:
        """Red-flag triage before any model call; counts flags by rule id, never text."""
        t0 = time.perf_counter()
        result = self.safety.triage(text)
        self.metrics.triage_seconds.observe(time.perf_counter() - t0)
        self.metrics.triage.labels(result.level).inc()
        for flag in result.flags:
            self.metrics.triage_flags.labels(flag.id, flag.level).inc()
        if not result.in_scope:
            self.metrics.scope_refusals.inc()
        return result

    def _max_new(self, consult: Consult, bare_tokens: int) -> int:
        if consult.max_new_tokens is not None:
            return consult.max_new_tokens
        return max(1, min(self.settings.max_new_tokens_default, self.engine.context_length - bare_tokens))

    def _prompt(self, c: Consult, prompt: list[int], max_new: int) -> tuple[list[int], list[Passage]]:
        """The prompt's token ids and the passages in it. What must fit is the role and the question; the
        evidence block gets the context that is left (it is what gets cut, never the question), and the
        earlier turns of a conversation what is left after it, oldest dropped first."""
        engine = self.engine
        self.check_context(len(prompt), max_new, c.param)
        block, passages = "", []
        if c.evidence or (c.evidence is None and self.evidence is not None):
            self.require_evidence("evidence")
            room = engine.context_length - len(prompt) - max_new - EVIDENCE_FRAME_TOKENS
            passages, block = self.retrieve(c.role, c.question, c.evidence_k, room)
            if not block:
                passages = []
        if not c.history:
            return (engine.encode_question(c.question, c.role, block) if block else prompt), passages
        limit = engine.context_length - max_new
        encoded: dict[int, list[int]] = {}

        def fits(turns: Sequence[Turn]) -> bool:
            encoded[len(turns)] = engine.encode_question(c.question, c.role, block, turns)
            return len(encoded[len(turns)]) <= limit

        kept = fit_history(c.history, fits)
        ids = encoded.get(len(kept)) or engine.encode_question(c.question, c.role, block, kept)
        if len(kept) < len(c.history):
            self.metrics.history_truncations.inc()
        return ids, passages

    def check_context(self, prompt_tokens: int, max_new: int, param: str) -> None:
        limit = self.engine.context_length
        if prompt_tokens + max_new > limit:
            raise ApiError(
                400,
                "context_length_exceeded",
                f"prompt ({prompt_tokens} tokens) + {param} ({max_new}) exceeds the model's context of {limit} tokens; "
                f"shorten the question or lower {param} to at most {max(limit - prompt_tokens, 0)}",
                param,
            )

    # ---- evidence -------------------------------------------------------------------
    def evidence_contract(self) -> tuple[int, int]:
        """(k, max_tokens): the settings, else what the checkpoint was trained with, else the defaults."""
        k = self.settings.evidence_k or self.contract.evidence_k or DEFAULT_K
        budget = self.settings.evidence_max_tokens or self.contract.evidence_max_tokens or DEFAULT_MAX_TOKENS
        return int(k), int(budget)

    def require_evidence(self, param: str) -> EvidencePack:
        """The loaded pack, or a 400 saying why there is none (a request asked for evidence)."""
        if self.evidence is None:
            raise ApiError(400, "evidence_unavailable", f"evidence was asked for but {self.evidence_note}", param)
        return self.evidence

    def retrieve(self, role: str, question: str, k: int | None, room: int) -> tuple[list[Passage], str]:
        """Passages and the evidence block for a prompt, within ``room`` tokens of context."""
        default_k, max_tokens = self.evidence_contract()
        t0 = time.perf_counter()
        passages, block = gather(
            self.evidence,
            role,
            question,
            self._evidence_tokens,
            k or default_k,
            min(max_tokens, room),
            token_ends=self.engine.token_ends,
        )
        self.metrics.evidence_seconds.observe(time.perf_counter() - t0)
        self.metrics.evidence_requests.labels("hit" if passages else "empty").inc()
        self.metrics.evidence_passages.inc(len(passages))
        return passages, block

    # ---- deliver ------------------------------------------------------------------------
    def deliver(self, plan: Plan, result: GenerationResult | None) -> Answer:
        """What every generating route delivers: the fixed advice first, then the model's sentences that
        a cited passage supports (with their [n]), composed from the passages when too few are; when the
        quality gate withholds the model's text, a plain statement of that, then what the sources say.
        ``result`` None: the plan was refused, and the answer is the rule file's refusal."""
        prefix = plan.triage.prefix
        if result is None:
            return Answer(compose(prefix, self.safety.refusal_for(plan.triage)))
        question, passages = plan.consult.question, plan.passages
        quality = self.quality(result.text, question, result.perplexity)
        if quality.degenerate and (plan.mode == "off" or not passages):
            # nothing to check the text against: the gate's verdict stands, with the evidence to read
            g = Grounding(shown_answer(result.text, quality, passages), "model", plan.mode)
            g.method = "withheld by the quality gate (no evidence to check against, or grounding off)"
            return self.answered(compose(prefix, g.text), quality, g, result)
        # a stream shows what its sentence gate released, so the plain answer is the same text: the
        # model's sentences a passage supports (a loop's repeats once), else what the sources say
        t0 = time.perf_counter()
        g = ground(result.text, passages, question, plan.mode, self._lexicon())
        self.observe_grounding(g, time.perf_counter() - t0)
        return self.answered(compose(prefix, g.text or shown_answer("", quality, passages)), quality, g, result)

    def stream(self, plan: Plan) -> StreamedAnswer:
        """The same answer for a stream: sentences leave once complete and checked."""
        checker = Checker(plan.passages, plan.consult.question, self._lexicon()) if plan.passages else None
        return StreamedAnswer(self, plan, SentenceGate(checker, plan.mode))

    def quality(self, answer: str, question: str, perplexity: float | None) -> Quality:
        """The quality gate, with the answer's perplexity placed among the model's held-out answers."""
        quality = assess(answer, question, perplexity, list(self.contract.reference_perplexities) or None)
        for reason in quality.reasons:
            self.metrics.degenerate.labels(reason).inc()
        return quality

    def answered(self, text: str, quality: Quality, grounding: Grounding, result: GenerationResult) -> Answer:
        """The delivered answer of a generation: its text, how it was made, its perplexity or why none."""
        return Answer(text, quality, grounding, result.perplexity, self._perplexity_note(result))

    def _perplexity_note(self, result: GenerationResult) -> str | None:
        """Why an answer has no perplexity (None when it has one)."""
        if result.perplexity is not None:
            return None
        problem = self.engine.score_problem or "the engine returned no log-probabilities"
        return f"no perplexity: the upstream engine cannot score this answer ({problem})"

    def _lexicon(self) -> frozenset[str]:
        return self.evidence.lexicon if self.evidence is not None else frozenset()

    def observe_grounding(self, g: Grounding, seconds: float) -> None:
        """Grounding's metrics: time, where answers come from, supported and withheld sentences."""
        self.metrics.grounding_seconds.observe(seconds)
        self.metrics.answer_source.labels(g.answer_source).inc()
        report = g.public()
        self.metrics.grounding_sentences.labels("supported").inc(report["supported"])
        self.metrics.grounding_sentences.labels("withheld").inc(report["withheld"])


class StreamedAnswer:
    """A plan's answer as a stream: ``advice`` first, ``feed`` each piece of model text (what may be
    sent now), ``close`` with the result (the rest, and the delivered answer: exactly what was sent)."""

    def __init__(self, clinic: Clinic, plan: Plan, gate: SentenceGate) -> None:
        self.clinic, self.plan, self.gate = clinic, plan, gate

    @property
    def advice(self) -> str:
        """The rule-owned advice that opens the stream ("" when there is none)."""
        return self.plan.triage.prefix + "\n\n" if self.plan.triage.prefix else ""

    def feed(self, piece: str) -> str:
        return self.gate.feed(piece)

    def close(self, result: GenerationResult) -> tuple[str, Answer]:
        clinic, plan = self.clinic, self.plan
        question, prefix = plan.consult.question, plan.triage.prefix
        quality = clinic.quality(result.text, question, result.perplexity)
        t0 = time.perf_counter()
        tail, grounding = self.gate.close(question)
        clinic.observe_grounding(grounding, time.perf_counter() - t0)
        if self.gate.checker is None and quality.degenerate:  # unchecked text: the plain answer's verdict
            return tail, clinic.answered(
                compose(prefix, shown_answer(result.text, quality, [])), quality, grounding, result
            )
        if not grounding.text and quality.degenerate:  # nothing released: say so, as the plain answer does
            tail = grounding.text = shown_answer("", quality, [])
        return tail, clinic.answered(compose(prefix, grounding.text), quality, grounding, result)


def shown_answer(text: str, quality: Quality, passages: list[Passage] | None = None) -> str:
    """What a client reads as the answer: the model's text, or a plain statement that there is none,
    pointing at the evidence a clinician can read instead."""
    if not quality.degenerate:
        return text.strip()
    out = withheld(quality)
    if passages:
        out += "\nEvidence you can check:\n" + "\n".join(
            f"[{i}] {p.title} ({p.source}{', ' + p.url if p.url else ''})" for i, p in enumerate(passages, 1)
        )
    return out
