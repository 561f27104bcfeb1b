"""The rows decoding together. ``DecodeBatch`` runs the model's own forward over a growing KV cache
(rows join by left-padding and concatenation, leave by index selection); ``StaticDecodeBatch`` keeps
the same contract on ``app.engine.decode``'s static cache (one slot per row). Both sample with a
``Sampler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from app.engine.base import GenerationJob
from app.engine.decode import StaticDecoder
from app.engine.sampling import Row, Sampler, generator


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dimension -2 (KV) or -1 (mask) on the left up to ``width``."""
    if x.dim() == 2:
        return torch.nn.functional.pad(x, (width - x.shape[-1], 0))
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[-2], 0))


def merge(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
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

    def __init__(self, model: Any, pad_id: int, sampler: Sampler) -> None:
        self.model, self.pad_id, self.sampler = model, pad_id, sampler
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, jobs: Sequence[GenerationJob]) -> list[Row]:
        """Prefill newcomers, sample their first token, merge those still going into the batch;
        returns the rows that ended at once (first token was EOS, or one token was asked for)."""
        if not jobs:
            return []
        rows = [Row(job, generator(job.params.seed)) for job in jobs]
        cache, mask, logits = self._prefill(jobs)
        tokens = self.sampler.step(rows, logits)
        alive = [i for i, row in enumerate(rows) if row.finish is None]
        if alive:
            cache, mask = select_rows(cache, mask, alive)
            if self.rows:
                self.cache, self.mask = merge(self.cache, self.mask, cache, mask)
            else:
                self.cache, self.mask = cache, mask
            self.rows += [rows[i] for i in alive]
            self.tokens += [tokens[i] for i in alive]
        return [row for row in rows if row.finish is not None]

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

    def step(self) -> None:
        """One decode step for every row: feed each its last token, sample its next."""
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out = self.model(
            input_ids=torch.tensor(self.tokens, device=self.mask.device).unsqueeze(1),
            attention_mask=self.mask,
            position_ids=self.mask.sum(-1, keepdim=True) - 1,
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        self.tokens = self.sampler.step(self.rows, out.logits[:, -1, :])

    def drop_finished(self) -> list[Row]:
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


class Filling:
    """A prompt being run into its slot, a chunk at a time, before its row joins the decode steps."""

    def __init__(self, row: Row, slot: int) -> None:
        self.row, self.slot = row, slot
        self.done: int | None = None  # tokens in the slot; None: its kept prefix not looked up yet

    @property
    def ids(self) -> list[int]:
        return self.row.job.prompt_ids


class StaticDecodeBatch:
    """``DecodeBatch``'s contract on app.engine.decode's static KV cache: the running rows are slots
    ``0..n-1``; a new row's prompt runs into a free slot above them; a row that ends is replaced by
    the last one (one row's cache moved, nothing concatenated).

    Chunked prefill (as vLLM's): while rows are decoding, prompts advance by at most ``chunk``
    tokens per step, between decode steps, so a burst of long questions (an /ask carries a few
    hundred tokens of evidence) never stalls the rows already answering; with no row decoding,
    prompts run whole (nothing to interleave with). A prompt starts from the longest prefix the
    decoder kept (``StaticDecoder.reuse``)."""

    def __init__(self, decoder: StaticDecoder, sampler: Sampler, chunk: int | None = None) -> None:
        self.decoder, self.sampler, self.chunk = decoder, sampler, chunk
        self.rows: list[Row] = []
        self.tokens: list[int] = []
        self.positions: list[int] = []  # where each row's next fed token goes (its length so far)
        self.filling: list[Filling] = []
        self.ended: list[Row] = []  # rows that ended on their first token, for drop_finished

    def __len__(self) -> int:
        return len(self.rows) + len(self.filling)

    def admit(self, jobs: Sequence[GenerationJob]) -> list[Row]:
        """Each prompt gets a free slot and its kept prefix, then prompts advance (whole when no
        row is decoding); returns the rows that ended at once."""
        for job in jobs:
            row = Row(job, generator(job.params.seed))
            used = {f.slot for f in self.filling}
            slot = next(s for s in range(len(self.rows), self.decoder.max_rows) if s not in used)
            self.filling.append(Filling(row, slot))
        self._fill(self.chunk if self.rows else None)
        ended, self.ended = self.ended, []
        return ended

    def _fill(self, budget: int | None) -> None:
        """Advance the prompts in arrival order by ``budget`` tokens in all (None: to their end);
        a prompt that is complete samples its first token and its row joins the decode steps."""
        while self.filling and (budget is None or budget > 0):
            f = self.filling[0]
            if f.done is None:  # looked up when its turn comes: the prompts before it are kept by then
                f.done = self.decoder.reuse(f.slot, f.ids)
            take = len(f.ids) - f.done if budget is None else min(budget, len(f.ids) - f.done)
            logits = self.decoder.extend(f.slot, f.ids[f.done : f.done + take], f.done)
            f.done += take
            if budget is not None:
                budget -= take
            if f.done < len(f.ids):
                continue
            self.filling.pop(0)
            token = self.sampler.step([f.row], logits)[0]  # the first token leaves before the prompt is kept
            self.decoder.remember(f.slot, f.ids)
            if f.row.finish is not None:
                self.ended.append(f.row)
                continue
            self._join(f, token)

    def _join(self, f: Filling, token: int) -> None:
        """A filled prompt's row takes the next running slot (trading places with a prompt still filling there)."""
        target = len(self.rows)
        if f.slot != target:
            other = next((g for g in self.filling if g.slot == target), None)
            if other is None:
                self.decoder.move_row(f.slot, target, len(f.ids))
            else:
                self.decoder.swap_rows(f.slot, target, len(f.ids), other.done or 0)
                other.slot = f.slot
        self.rows.append(f.row)
        self.tokens.append(token)
        self.positions.append(len(f.ids))

    def step(self) -> None:
        if self.rows:
            logits = self.decoder.decode(self.tokens, self.positions)
            self.positions = [p + 1 for p in self.positions]
            self.tokens = self.sampler.step(self.rows, logits)
        else:  # only prompts filling: run them (nothing decodes meanwhile)
            self._fill(None)

    def drop_finished(self) -> list[Row]:
        done = [row for row in self.rows if row.finish is not None] + self.ended
        self.ended = []
        if not done:
            return []
        n = sum(1 for row in self.rows if row.finish is None)
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
