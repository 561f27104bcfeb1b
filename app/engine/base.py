"""What every engine is and says (no model code): the sampling settings of a request, a generation
job and its result, prompt log-probabilities, the errors an engine raises, and ``EngineBase`` (the
checkpoint's tokenizer, chat template, manifest and limits, shared by the local and upstream engines).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.clinical.prompting import Turn, render_prompt
from app.clinical.scoring import Score, score_from_logprobs
from app.manifest import read_manifest, verify_checkpoint

# (context, target, encode_for_scoring(context, target)): encoded once, where the length is checked
ScoreItem = tuple[str | None, str, tuple[list[int], int]]


class CheckpointError(RuntimeError):
    """The checkpoint cannot be served; the message says exactly why."""


class EngineError(Exception):
    """A failure the engine can explain to the client: ``status``/``type``/``message`` are what
    the request is answered with (an upstream that is down, timed out or cannot score)."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    # generation ends at the first of these strings, which is left out of the text (OpenAI ``stop``)
    stop: tuple[str, ...] = ()
    # OpenAI's semantics over the tokens generated so far: logit -= count * frequency + (count > 0) * presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_logprobs: int = 0  # report the k most likely tokens at each generated position
    ignore_eos: bool = False  # vLLM's benchmarking switch: generate max_new_tokens whatever the model says


# (log-probability, top alternatives or None) of the end-of-sequence token that ended a row
EosEntry = tuple[float, dict[str, float] | None]


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # called with each new piece of text
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    first_token_at: float | None
    top: list[dict[str, float]] | None = None  # per generated token, when params.top_logprobs > 0
    # the end-of-sequence token that ended generation: not part of the answer's text or perplexity,
    # but OpenAI clients (lm-eval) expect its entry in a completion's logprobs, as vLLM gives it
    eos: EosEntry | None = None
    # an upstream engine reports each token's text, not its id: then token_ids is empty and
    # ``pieces`` holds the texts (one per log-prob)
    pieces: list[str] | None = None
    # False when the engine could give no log-probabilities: no perplexity, never a made-up one
    scored: bool = True
    generated: int | None = None  # tokens generated, when neither ids nor pieces are known

    @property
    def completion_tokens(self) -> int:
        """Tokens of the answer (the end-of-sequence token not counted)."""
        if self.generated is not None:
            return self.generated
        return len(self.token_ids) or len(self.pieces or [])

    @property
    def score(self) -> Score:
        return score_from_logprobs(self.logprobs, self.text)

    @property
    def perplexity(self) -> float | None:
        """The answer's token perplexity, or None when the engine gave no log-probabilities."""
        return self.score.perplexity if self.scored else None

    @property
    def finish(self) -> str:
        """The finish reason clients see: ``stop`` (end of sequence or a stop string) or ``length``."""
        return "stop" if self.finish_reason == "stop" else "length"


@dataclass
class PromptLogprobs:
    tokens: list[str]
    token_ids: list[int]
    offsets: list[int]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]


def text_offsets(tokens: Sequence[str]) -> list[int]:
    """Where each token's text starts in their concatenation (OpenAI's ``text_offset``)."""
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return offsets


class EngineBase:
    """What every engine shares: the checkpoint's tokenizer, chat template, manifest and limits.

    The service renders, counts and checks every prompt itself, whoever computes it: this
    process (``Engine``) or an upstream OpenAI-compatible server (``app.engine.upstream``). The
    scheduler asks an engine for ``generate``, ``score`` and ``prompt_logprobs``.

    Threads: ``tokenizer`` belongs to the scheduler's worker thread. Routes encode and decode
    on the event loop with ``front``, a second instance of the same tokenizer: a fast tokenizer
    shared by two threads can fail with "Already borrowed" (huggingface/tokenizers#537), and a
    second instance costs a few MB where sending every encode through the worker would queue
    it behind decode steps.
    """

    name = "local"
    kernel = "none"
    device = "none"
    continuous_batching = True
    score_problem: str | None = None  # why this engine cannot score prompts (None: it can)
    # True: scoring and calls wait on the network (an upstream engine), and the scheduler runs them on
    # threads of their own beside generation; False: they compute here, on the worker thread, in turn
    concurrent_calls = False

    def __init__(
        self,
        tokenizer: Any,
        folder: Path,
        manifest: dict[str, Any],
        config: dict[str, Any],
        load_seconds: float,
        front: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.front = front if front is not None else tokenizer
        self.folder = folder
        self.manifest = manifest
        self.load_seconds = load_seconds
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.context_length: int = int(config.get("max_position_embeddings") or 2048)
        self.vocab_size: int = int(config.get("vocab_size") or len(tokenizer))
        qdict = config.get("quantization_config") or {}
        self.quantization: dict[str, Any] = {
            k: qdict.get(k) for k in ("quant_method", "bits", "group_size", "sym", "desc_act") if k in qdict
        }

    # ---- prompts (event loop side: the ``front`` tokenizer) ------------------
    def encode_question(self, question: str, role: str, evidence: str = "", history: Sequence[Turn] = ()) -> list[int]:
        return self.encode(render_prompt(self.front, question, role, evidence, history))

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        # special tokens come from the chat template (see app.clinical.prompting)
        return self.front(text, add_special_tokens=False)["input_ids"]

    def token_ends(self, text: str) -> list[int] | None:
        """Where each token of ``text`` ends (character offsets), or None from a tokenizer without offsets."""
        if not getattr(self.front, "is_fast", False):
            return None
        return [
            end for _, end in self.front(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ]

    # ---- what the scheduler asks (worker thread) -------------------------------
    def generate(
        self,
        jobs: Sequence[GenerationJob],
        admit: Callable[[int], Sequence[GenerationJob]] | None = None,
        on_finish: Callable[[GenerationJob, GenerationResult], None] | None = None,
        max_rows: int | None = None,
        on_error: Callable[[GenerationJob, BaseException], None] | None = None,
    ) -> list[GenerationResult]:
        raise NotImplementedError

    def score(
        self, items: Sequence[ScoreItem], batch_size: int = 16, cancelled: Callable[[], bool] | None = None
    ) -> list[Score | BaseException]:
        """One score per item; an engine whose items fail one by one puts the exception in its place."""
        raise NotImplementedError

    def prompt_logprobs(self, ids: list[int], top_k: int) -> PromptLogprobs:
        raise NotImplementedError

    def unavailable(self) -> str | None:
        """Why the engine cannot take work right now (an upstream that is down), or None."""
        return None

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "engine": {"name": self.name},
            "name": m.get("name"),
            "base_model": m.get("base_model"),
            "architecture": m.get("architecture"),
            "parameters": m.get("parameters"),
            "quantization": self.quantization or {"quant_method": None},
            "kernel": self.kernel,
            "device": self.device,
            "context_length": self.context_length,
            "heldout_metrics": m.get("metrics"),
            "created": m.get("created"),
            "git_commit": m.get("git_commit"),
            "libraries": m.get("libraries"),
            "load_seconds": round(self.load_seconds, 3),
        }

    def close(self) -> None:
        """Release what the engine holds beyond memory (connections, threads)."""


def open_checkpoint(folder: Path) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """Verify a checkpoint against its manifest and load its text side: (worker tokenizer,
    front tokenizer, manifest, config). Every engine starts here, with weights or without."""
    folder = Path(folder)
    problems = verify_checkpoint(folder)
    if problems:
        raise CheckpointError(f"checkpoint {folder} is not servable: " + "; ".join(problems))
    manifest = read_manifest(folder)
    config = _read_json(folder / "config.json")
    qcfg = config.get("quantization_config")
    if qcfg and qcfg.get("quant_method") != "gptq":
        raise CheckpointError(
            f"checkpoint {folder} uses quantization {qcfg.get('quant_method')!r}; this service serves GPTQ or unquantized checkpoints"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a broken tokenizer is a checkpoint fault, said plainly
        raise CheckpointError(f"tokenizer in {folder} cannot be loaded: {exc}") from exc
    if not tokenizer.chat_template:
        raise CheckpointError(f"tokenizer in {folder} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    front = AutoTokenizer.from_pretrained(folder)
    front.pad_token = tokenizer.pad_token
    return tokenizer, front, manifest, config


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
