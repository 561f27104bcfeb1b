"""Rejected answers for DPO, chosen by the recipe's ``dpo.negatives``.

- ``space``: the paper's single space. Kept for reproduction; it teaches only
  "do not stop at once".
- ``mismatched``: the gold answer of the most similar *different* case (BM25
  over the prompts). A hard negative: fluent, clinical, on a neighbouring
  topic, and wrong for this patient.
  With ``dpo.mismatch: shuffled`` the other case is drawn at random (a seeded
  derangement): still fluent and clinical, but usually another topic.
- ``sampled``: the SFT model's own answer, sampled. The model learns to prefer
  the reference answer over what it currently says.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from training.data import MedTextRow
from training.evidence import CasePrompter

_TOKEN = re.compile(r"[a-z0-9]+")


def _terms(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def mismatched_negatives(rows: Sequence[MedTextRow]) -> list[str]:
    """For each row, the completion of its nearest neighbour by BM25 over prompts."""
    from rank_bm25 import BM25Okapi

    if len(rows) < 2:
        raise ValueError("mismatched negatives need at least two rows")
    bm25 = BM25Okapi([_terms(r.prompt) for r in rows])
    negatives = []
    for i, row in enumerate(rows):
        scores = bm25.get_scores(_terms(row.prompt))
        scores[i] = float("-inf")
        for j in sorted(range(len(rows)), key=lambda k: -scores[k]):
            if rows[j].completion != row.completion:
                negatives.append(rows[j].completion)
                break
    return negatives


def shuffled_negatives(rows: Sequence[MedTextRow], seed: int) -> list[str]:
    """For each row, the completion of a different row picked by a seeded derangement."""
    import random

    if len({r.completion for r in rows}) < 2:
        raise ValueError("mismatched negatives need at least two distinct answers")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        if all(rows[i].completion != rows[j].completion for i, j in enumerate(order)):
            return [rows[j].completion for j in order]


def mismatched(rows: Sequence[MedTextRow], mismatch: str, seed: int) -> list[str]:
    """The mismatched negatives of ``dpo.mismatch`` kind (``nearest`` or ``shuffled``)."""
    if mismatch == "nearest":
        return mismatched_negatives(rows)
    if mismatch == "shuffled":
        return shuffled_negatives(rows, seed)
    raise ValueError(f"unknown mismatch {mismatch!r}")


@torch.inference_mode()
def sampled_negatives(
    model: Any,
    prompter: CasePrompter,
    rows: Sequence[MedTextRow],
    max_new_tokens: int,
    seed: int,
    batch_size: int = 8,
) -> list[str]:
    """The model's own sampled answers, left-padded batches."""
    torch.manual_seed(seed)
    tokenizer = prompter.tokenizer
    tokenizer.padding_side = "left"
    out: list[str] = []
    prompts = [prompter(r) for r in rows]
    for lo in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[lo : lo + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_p=0.95,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        for seq in gen[:, enc["input_ids"].shape[1] :]:
            text = tokenizer.decode(seq, skip_special_tokens=True).strip()
            out.append(text or " ")
    tokenizer.padding_side = "right"
    return out


def preference_pairs(
    rows: Sequence[MedTextRow],
    prompter: CasePrompter,
    strategy: str,
    model: Any = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    mismatch: str = "nearest",
) -> list[dict[str, str]]:
    """DPO triples (prompt, chosen, rejected); the prompt is the served role prompt."""
    if strategy == "space":
        rejected = [" "] * len(rows)
    elif strategy == "mismatched":
        rejected = mismatched(rows, mismatch, seed)
    elif strategy == "sampled":
        if model is None:
            raise ValueError("sampled negatives need the SFT model")
        rejected = sampled_negatives(model, prompter, rows, max_new_tokens, seed)
    else:
        raise ValueError(f"unknown negatives strategy {strategy!r}")
    return [
        {
            "prompt": prompter(r),
            "chosen": r.completion,
            "rejected": neg,
        }
        for r, neg in zip(rows, rejected, strict=True)
    ]
