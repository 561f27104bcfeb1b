"""Sampling and per-row state: each row of a batch samples with its own settings and generator, and
``Sampler`` records what a row made (token, log-probability, streamed text, stop) and ends it.

Penalties change what is sampled; the log-probabilities reported stay those of the raw model (as
vLLM's default), so perplexity means the same with or without them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from app.clinical.scoring import chosen_logprobs
from app.engine.base import EosEntry, GenerationJob, GenerationResult, SamplingParams


@dataclass
class Row:
    """One request's decoding state while it is in the batch."""

    job: GenerationJob
    gen: torch.Generator
    ids: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    text: str = ""  # what has been streamed
    decoded: str = ""  # the ids' text so far (incremental: see Sampler._decode)
    window: int = 0  # ids[window:read] were decoded last time: the context the next piece is decoded with
    read: int = 0
    finish: str | None = None
    first_at: float | None = None
    tops: list[dict[str, float]] = field(default_factory=list)
    stop_at: int | None = None  # where a stop string begins in the decoded text
    eos: EosEntry | None = None


def find_stop(text: str, stops: Sequence[str], streamed: int) -> int | None:
    """The start of the earliest stop string in ``text``; only text not yet streamed is searched
    (what was streamed was checked already, and held back long enough to be)."""
    hits = [i for s in stops if (i := text.find(s, max(streamed - len(s) + 1, 0))) >= 0]
    return min(hits) if hits else None


def penalised(logits: torch.Tensor, row: Row) -> torch.Tensor:
    p = row.job.params
    if not (p.frequency_penalty or p.presence_penalty) or not row.ids:
        return logits
    counts = torch.bincount(torch.tensor(row.ids), minlength=logits.shape[-1]).to(logits.device, logits.dtype)
    return logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty


def first_maxima(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (its first maximum; a row with NaN: its first NaN, as torch.argmax). numpy's on CPU
    float32: 10 us for 16 rows of the shipped vocabulary, 1.6 us for one, where torch's takes 110 and 8.8
    (its last-dimension argmax is not vectorised on CPU)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.detach().numpy().argmax(-1).tolist()
    return torch.argmax(logits, dim=-1).tolist()


def _plain_greedy(params: SamplingParams) -> bool:
    """Argmax of the raw logits: greedy, no penalty."""
    return params.temperature < MIN_TEMPERATURE and not (params.frequency_penalty or params.presence_penalty)


def generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return gen


# below this, sampling is argmax in all but name, and dividing by it overflows float32
MIN_TEMPERATURE = 1e-4


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    if params.temperature < MIN_TEMPERATURE:
        return first_maxima(logits[None])[0]
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # logits themselves not finite: the limit is argmax
        return first_maxima(logits[None])[0]
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        cut = cum - sorted_p > params.top_p  # keep the smallest set reaching top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


class Sampler:
    """Turns a step's logits into each row's next token and keeps the rows' records; the batches
    (``app.engine.batch``) call it once per step."""

    def __init__(self, tokenizer: Any, eos_id: int) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def step(self, rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
        """Sample each row's next token (its own settings), then score them all at once.

        Penalties change what is sampled; the log-probabilities reported stay those of the raw
        model (as vLLM's default), so perplexity means the same with or without them."""
        # greedy rows without penalties (the common case) take one argmax over the batch, not one call each
        plain = [r for r, row in enumerate(rows) if _plain_greedy(row.job.params)]
        picks: dict[int, int] = {}
        if plain:
            picks = dict(zip(plain, first_maxima(logits if len(plain) == len(rows) else logits[plain]), strict=True))
        tokens = [
            picks[r] if r in picks else sample(penalised(logits[r], row), row.job.params, row.gen)
            for r, row in enumerate(rows)
        ]
        lps = chosen_logprobs(logits, torch.tensor(tokens, device=logits.device)).tolist()
        for r, (row, token, lp) in enumerate(zip(rows, tokens, lps, strict=True)):
            k = row.job.params.top_logprobs
            self._record(row, token, lp, self._top(logits[r], k) if k > 0 else None)
        return tokens

    def _top(self, logits: torch.Tensor, k: int) -> dict[str, float]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        vals, idx = logp.topk(k)
        return {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(vals, idx, strict=True)}

    def _record(self, row: Row, token: int, logprob: float, top: dict[str, float] | None = None) -> None:
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
            text = self._decode(row)
            if params.stop:
                cut = find_stop(text, params.stop, len(row.text))
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

    def _decode(self, row: Row) -> str:
        """The row's text so far, decoding only the new ids with a few before them for context (vLLM's
        incremental detokenizing): decoding every id at every step made a step's cost grow with the answer
        (about 50 us a row at 64 tokens, 16 rows a step). The piece is the text of ``ids[window:]`` past the
        text of ``ids[window:read]``: both decoded from the same first id, so a tokenizer's handling of a
        leading space or a byte sequence is the same in both. An unfinished character waits for its bytes."""
        ids = row.ids
        before = self.tokenizer.decode(ids[row.window : row.read], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[row.window :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            row.decoded += after[len(before) :]
            row.window, row.read = row.read, len(ids)
        return row.decoded

    def result(self, row: Row) -> GenerationResult:
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
