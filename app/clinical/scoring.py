"""The one place where perplexity is computed from logits.

Conventions follow lm-evaluation-harness: word perplexity divides the total
log-likelihood by the number of whitespace-separated words, bits per byte by
the UTF-8 byte count times ln 2, and aggregates sum log-likelihoods before
dividing (a corpus number, not a mean of per-document numbers). Evaluation
reports and the service's /perplexity endpoint both call this module, so the
numbers agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

_WORDS = re.compile(r"\s+")


def count_words(text: str) -> int:
    """Whitespace-separated words, as lm-evaluation-harness counts them."""
    stripped = text.strip()
    return len(_WORDS.split(stripped)) if stripped else 0


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


@dataclass(frozen=True)
class Score:
    """Log-likelihood of a scored text and the units to normalise it by."""

    sum_logprob: float
    tokens: int
    words: int
    bytes: int
    token_logprobs: list[float] = field(default_factory=list, compare=False, repr=False)

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return _safe_exp(-self.sum_logprob / max(self.tokens, 1))

    @property
    def word_perplexity(self) -> float:
        return _safe_exp(-self.sum_logprob / max(self.words, 1))

    @property
    def bits_per_byte(self) -> float:
        return -self.sum_logprob / (max(self.bytes, 1) * math.log(2))

    def metrics(self) -> dict[str, float | int]:
        return {
            "perplexity": self.perplexity,
            "word_perplexity": self.word_perplexity,
            "bits_per_byte": self.bits_per_byte,
            "mean_logprob": self.mean_logprob,
            "tokens": self.tokens,
            "words": self.words,
            "bytes": self.bytes,
        }


def _safe_exp(x: float) -> float:
    # JSON has no infinity; an overflow means "astronomically unlikely".
    return math.exp(min(x, 700.0))


def combine(scores: Iterable[Score]) -> Score:
    """Corpus-level score: sums of log-likelihoods and of units."""
    total, tokens, words, nbytes = 0.0, 0, 0, 0
    for s in scores:
        total += s.sum_logprob
        tokens += s.tokens
        words += s.words
        nbytes += s.bytes
    return Score(total, tokens, words, nbytes)


def score_from_logprobs(token_logprobs: Sequence[float], text: str) -> Score:
    return Score(
        sum_logprob=float(sum(token_logprobs)),
        tokens=len(token_logprobs),
        words=count_words(text),
        bytes=count_bytes(text),
        token_logprobs=[float(x) for x in token_logprobs],
    )


def chosen_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_ids[i] | ...) from the logits that predicted each of them.

    ``logits`` is (n, vocab) and row i is the distribution token_ids[i] was drawn
    from; computed in float32 so fp16/bf16 models do not lose the tail.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def encode_for_scoring(tokenizer: object, context: str | None, target: str) -> tuple[list[int], int]:
    """Token ids of context+target and the index where the scored target starts.

    Special tokens come from the chat template, never from the tokenizer.
    The target is tokenized as part of the whole string and split at the
    context's length, so tokenizers that merge across the boundary (or add a
    prefix space) score the tokens the model would really see. Without a
    context the target is conditioned on BOS (or EOS), as lm-eval's rolling
    log-likelihood does.
    """
    tok = tokenizer
    if context is None:
        start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # type: ignore[attr-defined]
        ids = tok(target, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        return [start_id, *ids], 1
    ctx = tok(context, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    full = tok(context + target, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if full[: len(ctx)] != ctx:
        full = ctx + tok(target, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return full, len(ctx)


@torch.inference_mode()
def score_encoded(
    model: torch.nn.Module,
    batch: Sequence[tuple[list[int], int]],
    pad_id: int,
) -> list[list[float]]:
    """Per-token log-probabilities of each sequence's target part, one forward pass."""
    if not batch:
        return []
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    out: list[list[float]] = []
    for row, (ids, start) in enumerate(batch):
        targets = input_ids[row, start : len(ids)].to(logits.device)
        # logits at position t predict token t+1
        lp = chosen_logprobs(logits[row, start - 1 : len(ids) - 1], targets)
        out.append(lp.cpu().tolist())
    return out


def score_texts(
    model: torch.nn.Module,
    tokenizer: object,
    items: Sequence[tuple[str | None, str]],
    batch_size: int = 8,
    encoded: Sequence[tuple[list[int], int]] | None = None,
) -> list[Score]:
    """Score each (context, target): log-likelihood of target given context.

    ``encoded`` is ``encode_for_scoring`` of each item when the caller already has it.
    """
    pad_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    if pad_id is None:
        pad_id = tokenizer.eos_token_id  # type: ignore[attr-defined]
    if encoded is None:
        encoded = [encode_for_scoring(tokenizer, ctx, tgt) for ctx, tgt in items]
    # sort by length so padded batches waste little compute
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))
    results: list[Score | None] = [None] * len(items)
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        lps = score_encoded(model, [encoded[i] for i in idx], pad_id)
        for i, lp in zip(idx, lps, strict=True):
            results[i] = score_from_logprobs(lp, items[i][1])
    return [r for r in results if r is not None]
