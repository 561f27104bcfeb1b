"""One loaded checkpoint and the three things the service asks of it:
batched generation, batched scoring and prompt log-probabilities.

The decode loop is our own rather than ``model.generate`` because a dynamic
batch mixes requests with different sampling settings, lengths, seeds and
stop times: each row samples with its own settings and generator, finished or
cancelled rows leave the KV cache at once, and every token is reported as it
is made (streaming) with its log-probability under the raw model (the
perplexity a clinician sees).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.clinical.prompting import Turn, render_prompt
from app.clinical.scoring import Score, chosen_logprobs, score_from_logprobs, score_texts
from app.engine.decode import MAX_STATIC_CACHE_BYTES, SMALL_ROWS, StaticDecoder, cache_bytes, cpu_flags, supports
from app.manifest import read_manifest, verify_checkpoint

log = logging.getLogger("medask.engine")


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


def resolve_dtype(wanted: str, device: str) -> str:
    """Activation dtype. ``auto``: the checkpoint's own (fp16 for GPTQ, the paper's setting) on a GPU;
    float32 on a CPU, where fp16 arithmetic is emulated: 1.57x the tokens/s at batch 16 here
    (benchmarks/batch_ceiling.py --dtype). 4-bit GPTQ weights stay 4-bit either way."""
    if wanted != "auto":
        return wanted
    return "float32" if device == "cpu" else "auto"


def pick_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("MEDASK_DEVICE=cuda but no CUDA device is visible")
    return wanted


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

    def score(self, items: Sequence[ScoreItem], batch_size: int = 16) -> list[Score]:
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


class Engine(EngineBase):
    """A checkpoint's weights loaded once, in this process; the model belongs to the worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        folder: Path,
        manifest: dict[str, Any],
        device: str,
        load_seconds: float,
        front: Any = None,
    ):
        config = model.config
        qcfg = getattr(config, "quantization_config", None)
        facts = {
            "max_position_embeddings": getattr(config, "max_position_embeddings", 2048),
            "vocab_size": getattr(config, "vocab_size", 0),
            "quantization_config": qcfg if isinstance(qcfg, dict) else (qcfg.to_dict() if qcfg is not None else {}),
        }
        super().__init__(tokenizer, folder, manifest, facts, load_seconds, front)
        self.model = model
        self.device = device
        self.kernel = _kernel_name(model)
        # the static decode step (app.engine.decode), set up by ``use_static_decoder``; None: the model's forward
        self.decoder: StaticDecoder | None = None
        self.decode_note = "the model's own forward (static decode step not set up)"
        # rows can join a running batch only when every layer's KV cache simply grows
        types = getattr(config, "layer_types", None) or ["full_attention"]
        self.continuous_batching: bool = getattr(config, "sliding_window", None) is None and all(
            t == "full_attention" for t in types
        )

    def use_static_decoder(
        self,
        max_rows: int,
        compile: bool = False,
        lm_head: str = "float32",
        decode_weights: str = "int4",
        prompt_weights: str = "bfloat16",
        dense_bytes: int = 1 << 30,
    ) -> float:
        """Decode with app.engine.decode's static KV cache and fused step (compiled if asked), when this
        model allows it; returns the seconds spent setting up (and compiling)."""
        reason = supports(self.model)
        if reason is None and (need := cache_bytes(self.model.config, max_rows)) > MAX_STATIC_CACHE_BYTES:
            reason = (
                f"a static KV cache for {max_rows} rows of the full context needs {need / 2**30:.1f} GiB "
                f"(more than {MAX_STATIC_CACHE_BYTES / 2**30:.0f}); lower MEDASK_MAX_BATCH_SIZE to use it"
            )
        if reason is None and self.device != "cpu":
            reason = f"device {self.device} (the fused step uses GPTQ's CPU kernel; CUDA graphs are future work)"
        if reason is not None:
            self.decode_note = f"the model's own forward: {reason}"
            return 0.0
        self.decoder = StaticDecoder(
            self.model,
            max_rows,
            compile=compile,
            lm_head=lm_head,
            dense_bytes=dense_bytes,
            decode_weights=decode_weights,
            prompt_weights=prompt_weights,
        )
        self.decode_note = "static KV cache, fused step" + (" (torch.compile)" if compile else " (eager)")
        try:
            return self.decoder.warm_up((1, 2))
        except Exception as exc:  # no C++ compiler, an unsupported op: the eager step computes the same
            if not compile:
                raise
            log.warning("torch.compile failed; decoding with the eager static step", exc_info=True)
            self.decoder.use_eager()
            self.decode_note = f"static KV cache, fused step (eager: torch.compile failed: {type(exc).__name__})"
            return self.decoder.warm_up((1, 2))

    # ---- loading -------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, device: str = "auto", dtype: str = "auto", threads: int | None = None) -> Engine:
        """Verify the checkpoint against its manifest, then load it once."""
        t0 = time.perf_counter()
        folder = Path(folder)
        tokenizer, front, manifest, config = open_checkpoint(folder)
        if threads:
            torch.set_num_threads(threads)
        dev = pick_device(device)
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev)}
        if dev == "cuda":
            kwargs["device_map"] = "cuda"
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except Exception as exc:
            raise CheckpointError(f"model in {folder} cannot be loaded: {exc}") from exc
        if dev == "cpu" and not config.get("quantization_config"):
            model = model.to("cpu")
        model.eval()
        return cls(model, tokenizer, folder, manifest, dev, time.perf_counter() - t0, front)

    # ---- generation ----------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        jobs: Sequence[GenerationJob],
        admit: Callable[[int], Sequence[GenerationJob]] | None = None,
        on_finish: Callable[[GenerationJob, GenerationResult], None] | None = None,
        max_rows: int | None = None,
        on_error: Callable[[GenerationJob, BaseException], None] | None = None,
    ) -> list[GenerationResult]:
        """Decode a batch together; each row has its own settings and stop time.

        Continuous batching: after every decode step ``admit(room)`` may hand over
        new jobs (at most ``room``, keeping at most ``max_rows`` rows); they are
        prefilled and join the running batch, so a request never waits for a
        whole batch to finish. ``on_finish`` hears of each row the moment it
        ends. Returns the results of ``jobs`` (admitted jobs only reach
        ``on_finish``). A failure fails the whole batch (it raises; ``on_error`` is for engines
        whose rows fail one by one).
        """
        if admit is not None and not self.continuous_batching:
            admit = None
        limit = max_rows or len(jobs)
        results: dict[int, GenerationResult] = {}

        def finish(rows: list[_Row]) -> None:
            for row in rows:
                result = self._result(row)
                results[id(row.job)] = result
                if on_finish is not None:
                    on_finish(row.job, result)

        batch: DecodeBatch | StaticDecodeBatch
        if self.decoder is not None and max(limit, len(jobs)) <= self.decoder.max_rows:
            batch = StaticDecodeBatch(self, self.decoder)
        else:  # no static decoder, or more rows than it has slots: the model's own forward
            batch = DecodeBatch(self)
        finish(batch.admit(jobs))
        while batch:
            batch.step()
            finish(batch.drop_finished())
            if admit is not None:  # every step, full or not: the scheduler also drops expired work here
                finish(batch.admit(admit(limit - len(batch))))
        return [results[id(job)] for job in jobs]

    def _prefill(self, jobs: Sequence[GenerationJob]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        dev = self.model.device
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: every row's last token is at -1
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # only the last position's logits are needed: the LM head over every prompt token was 8% of serving time
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.cache, mask, out.logits[:, -1, :]

    def _step_all(self, rows: Sequence[_Row], logits: torch.Tensor) -> list[int]:
        """Sample each row's next token (its own settings), then score them all at once.

        Penalties change what is sampled; the log-probabilities reported stay those of the raw
        model (as vLLM's default), so perplexity means the same with or without them."""
        tokens = [_sample(_penalised(logits[r], row), row.job.params, row.gen) for r, row in enumerate(rows)]
        lps = chosen_logprobs(logits, torch.tensor(tokens, device=logits.device)).tolist()
        for r, (row, token, lp) in enumerate(zip(rows, tokens, lps, strict=True)):
            k = row.job.params.top_logprobs
            self._record(row, token, lp, self._top(logits[r], k) if k > 0 else None)
        return tokens

    def _top(self, logits: torch.Tensor, k: int) -> dict[str, float]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        vals, idx = logp.topk(k)
        return {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(vals, idx, strict=True)}

    def _record(self, row: _Row, token: int, logprob: float, top: dict[str, float] | None = None) -> None:
        """Record a row's new token and decide whether the row is done."""
        job = row.job
        params = job.params
        if row.first_at is None:
            row.first_at = time.perf_counter()
        if token == self.eos_id and not params.ignore_eos:
            row.finish = "stop"
            row.eos = (logprob, top)
            return
        row.ids.append(token)
        row.lps.append(logprob)
        if top is not None:
            row.tops.append(top)
        if job.on_text is not None or params.stop:  # detokenize per step only when someone needs the text
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            if params.stop:
                cut = _find_stop(text, params.stop, len(row.text))
                if cut is not None:
                    row.stop_at, row.finish = cut, "stop"
                    return
            # a stop string may be forming at the end: hold its length back from the stream
            safe = len(text) - (max(map(len, params.stop)) - 1 if params.stop else 0)
            if job.on_text is not None and not text.endswith("\ufffd") and safe > len(row.text):
                job.on_text(text[len(row.text) : safe])
                row.text = text[:safe]
        if len(row.ids) >= params.max_new_tokens:
            row.finish = "length"
        elif job.cancelled.is_set():
            row.finish = "cancelled"

    def _result(self, row: _Row) -> GenerationResult:
        job = row.job
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if row.stop_at is not None:
            text = text[: row.stop_at]
        if job.on_text is not None and len(text) > len(row.text):
            job.on_text(text[len(row.text) :])  # flush a trailing partial character or held-back text
        return GenerationResult(
            text,
            row.ids,
            row.lps,
            row.finish or "length",
            len(job.prompt_ids),
            row.first_at,
            top=row.tops if job.params.top_logprobs > 0 else None,
            eos=row.eos,
        )

    # ---- scoring -------------------------------------------------------
    def score(self, items: Sequence[ScoreItem], batch_size: int = 16) -> list[Score]:
        """log p(target | context) per item: the same math as the evaluation report."""
        pairs = [(context, target) for context, target, _ in items]
        return score_texts(self.model, self.tokenizer, pairs, batch_size, [enc for _, _, enc in items])

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], top_k: int) -> PromptLogprobs:
        """Per-token log-probabilities of a prompt's tokens (OpenAI echo + logprobs)."""
        dev = self.model.device
        tokens = [self.tokenizer.decode([t]) for t in ids]
        offsets = text_offsets(tokens)
        if not ids:
            return PromptLogprobs([], [], [], [], [])
        logits = self.model(input_ids=torch.tensor([ids], device=dev)).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        lps: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        for i in range(1, len(ids)):
            lps.append(float(logp[i - 1, ids[i]]))
            if top_k > 0:
                vals, idx = logp[i - 1].topk(top_k)
                tops.append({self.tokenizer.decode([int(k)]): float(v) for v, k in zip(vals, idx, strict=True)})
            else:
                tops.append(None)
        return PromptLogprobs(tokens, ids, offsets, lps, tops)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["dtype"] = str(next(self.model.parameters()).dtype).replace("torch.", "")
        d = self.decoder
        out["decode"] = {
            "path": "static" if d is not None else "model",
            "note": self.decode_note,
            "compiled": bool(d and d.compiled),
            "lm_head": str(d.head_dtype).replace("torch.", "") if d is not None else None,
            # chosen by timing both on this CPU when MEDASK_LM_HEAD_DTYPE=auto (ms per 1-row + full-batch matmul)
            "lm_head_timing_ms": d.head_timing if d is not None else None,
            "cpu_flags": list(cpu_flags()),
            "slots": d.max_rows if d is not None else None,
            "kv_cache_mb": round(cache_bytes(self.model.config, d.max_rows) / 2**20, 1) if d is not None else None,
            # which weights serve a decode step and a prompt (int4: GPTQ's kernel; bfloat16/float32: a dense
            # copy read back through it), timed on this CPU at start unless forced; their bytes
            "decode_weights": {f"1-{SMALL_ROWS} rows": d.decode_small, "more rows": d.decode_large}
            if d is not None
            else None,
            "prompt_weights": d.prompt_weights if d is not None else None,
            "weight_timing_ms": d.weight_timing if d is not None else None,
            "dense_weights_mb": round(d.dense_bytes / 2**20, 1) if d is not None else None,
        }
        return out


@dataclass
class _Row:
    """One request's decoding state while it is in the batch."""

    job: GenerationJob
    gen: torch.Generator
    ids: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    text: str = ""  # what has been streamed
    finish: str | None = None
    first_at: float | None = None
    tops: list[dict[str, float]] = field(default_factory=list)
    stop_at: int | None = None  # where a stop string begins in the decoded text
    eos: EosEntry | None = None


def _find_stop(text: str, stops: Sequence[str], streamed: int) -> int | None:
    """The start of the earliest stop string in ``text``; only text not yet streamed is searched
    (what was streamed was checked already, and held back long enough to be)."""
    hits = [i for s in stops if (i := text.find(s, max(streamed - len(s) + 1, 0))) >= 0]
    return min(hits) if hits else None


def _penalised(logits: torch.Tensor, row: _Row) -> torch.Tensor:
    p = row.job.params
    if not (p.frequency_penalty or p.presence_penalty) or not row.ids:
        return logits
    counts = torch.bincount(torch.tensor(row.ids), minlength=logits.shape[-1]).to(logits.device, logits.dtype)
    return logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dimension -2 (KV) or -1 (mask) on the left up to ``width``."""
    if x.dim() == 2:
        return torch.nn.functional.pad(x, (width - x.shape[-1], 0))
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[-2], 0))


def _merge(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Append new rows to a running batch: left-pad both to one width, stack on the batch axis.

    Positions come from the mask and RoPE is already applied to cached keys, so
    padding on the left changes nothing for either side.
    """
    width = max(mask.shape[1], new_mask.shape[1])
    for old, new in zip(cache.layers, new_cache.layers, strict=True):
        old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
        old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
    return cache, torch.cat([_left_pad(mask, width), _left_pad(new_mask, width)], dim=0)


def select_rows(cache: Any, mask: torch.Tensor, rows: list[int]) -> tuple[Any, torch.Tensor]:
    """Keep only ``rows`` in the KV cache, then drop padding columns no row needs any more."""
    idx = torch.tensor(rows, device=mask.device)
    cache.batch_select_indices(idx)
    mask = mask[idx]
    used = torch.nonzero(mask.sum(0) > 0)
    start = int(used[0]) if len(used) else 0
    if start > 0:
        for layer in cache.layers:
            layer.keys = layer.keys[..., start:, :]
            layer.values = layer.values[..., start:, :]
        mask = mask[:, start:]
    return cache, mask


class DecodeBatch:
    """The rows decoding together and what they share: the KV cache, the attention mask and
    each row's next input token, kept in step by ``admit``, ``step`` and ``drop_finished``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, jobs: Sequence[GenerationJob]) -> list[_Row]:
        """Prefill newcomers, sample their first token, merge those still going into the batch;
        returns the rows that ended at once (first token was EOS, or one token was asked for)."""
        if not jobs:
            return []
        rows = [_Row(job, _generator(job.params.seed)) for job in jobs]
        cache, mask, logits = self.engine._prefill(jobs)
        tokens = self.engine._step_all(rows, logits)
        alive = [i for i, row in enumerate(rows) if row.finish is None]
        if alive:
            cache, mask = select_rows(cache, mask, alive)
            if self.rows:
                self.cache, self.mask = _merge(self.cache, self.mask, cache, mask)
            else:
                self.cache, self.mask = cache, mask
            self.rows += [rows[i] for i in alive]
            self.tokens += [tokens[i] for i in alive]
        return [row for row in rows if row.finish is not None]

    def step(self) -> None:
        """One decode step for every row: feed each its last token, sample its next."""
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out = self.engine.model(
            input_ids=torch.tensor(self.tokens, device=self.mask.device).unsqueeze(1),
            attention_mask=self.mask,
            position_ids=self.mask.sum(-1, keepdim=True) - 1,
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        self.tokens = self.engine._step_all(self.rows, out.logits[:, -1, :])

    def drop_finished(self) -> list[_Row]:
        """Take the rows that ended out of the batch (and out of the KV cache)."""
        done = [row for row in self.rows if row.finish is not None]
        if not done:
            return []
        keep = [r for r, row in enumerate(self.rows) if row.finish is None]
        if keep:
            self.cache, self.mask = select_rows(self.cache, self.mask, keep)
        else:
            self.cache, self.mask = None, torch.zeros((0, 0), dtype=torch.long)
        self.rows = [self.rows[r] for r in keep]
        self.tokens = [self.tokens[r] for r in keep]
        return done


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return gen


# below this, sampling is argmax in all but name, and dividing by it overflows float32
MIN_TEMPERATURE = 1e-4


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    if params.temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # logits themselves not finite: the limit is argmax
        return int(torch.argmax(logits))
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        cut = cum - sorted_p > params.top_p  # keep the smallest set reaching top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _kernel_name(model: Any) -> str:
    """Which linear kernel serves the weights: tells ops whether 4-bit stayed 4-bit."""
    for module in model.modules():
        if hasattr(module, "qweight"):
            return type(module).__name__
    return "torch.nn.Linear"


class StaticDecodeBatch:
    """``DecodeBatch``'s contract on app.engine.decode's static KV cache: the running rows are slots
    ``0..n-1``; a new row's prompt runs into the next free slot; a row that ends is replaced by
    the last one (one row's cache moved, nothing concatenated)."""

    def __init__(self, engine: Engine, decoder: StaticDecoder) -> None:
        self.engine = engine
        self.decoder = decoder
        self.rows: list[_Row] = []
        self.tokens: list[int] = []
        self.positions: list[int] = []  # where each row's next fed token goes (its length so far)

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, jobs: Sequence[GenerationJob]) -> list[_Row]:
        """Each prompt runs into the next free slot; a row that ends at once leaves it free."""
        ended = []
        for job in jobs:
            row = _Row(job, _generator(job.params.seed))
            logits = self.decoder.prefill(len(self.rows), job.prompt_ids)
            token = self.engine._step_all([row], logits[None])[0]
            if row.finish is not None:
                ended.append(row)
                continue
            self.rows.append(row)
            self.tokens.append(token)
            self.positions.append(len(job.prompt_ids))
        return ended

    def step(self) -> None:
        logits = self.decoder.decode(self.tokens, self.positions)
        self.positions = [p + 1 for p in self.positions]
        self.tokens = self.engine._step_all(self.rows, logits)

    def drop_finished(self) -> list[_Row]:
        done = [row for row in self.rows if row.finish is not None]
        if not done:
            return []
        n = len(self.rows) - len(done)
        holes = [s for s in range(n) if self.rows[s].finish is not None]
        movers = [s for s in range(n, len(self.rows)) if self.rows[s].finish is None]
        for hole, src in zip(holes, movers, strict=True):
            self.decoder.move_row(src, hole, self.positions[src])
            self.rows[hole], self.tokens[hole], self.positions[hole] = (
                self.rows[src],
                self.tokens[src],
                self.positions[src],
            )
        del self.rows[n:], self.tokens[n:], self.positions[n:]
        return done
