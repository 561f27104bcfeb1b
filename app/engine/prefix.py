"""Prompt prefixes whose keys and values are already computed, for the static decode step.

Every request in a role starts with the same system prompt, a follow-up in a conversation starts
with the whole previous turn, and an evaluation harness sends the same prompt again and again:
their keys and values do not change (RoPE is applied at the same absolute positions), so a new
prompt copies the longest prefix it shares with a kept prompt into its slot and computes only the
rest (llama-server's prompt cache and vLLM's prefix caching do the same). Kept prompts are evicted
least recently used first within a byte budget (``MEDASK_PREFIX_CACHE_MB``).

Prompts are kept whole, not cut at the shared part: the first request in a role cannot know
which part the next one will share, and a prompt kept whole also serves a repeat of itself.
Only token ids and tensors are kept, in memory, never text; nothing outlives the process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

# a shared prefix shorter than this is recomputed: copying it saves less than the lookup costs
MIN_SHARED = 16


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Kept prompts: token ids -> per-layer (keys, values), each (kv_heads, length, head_dim)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.bytes = 0
        self.hits = 0  # prompts that reused a prefix
        self.reused_tokens = 0  # prompt tokens not recomputed
        self.lookups = 0

    def find(self, ids: Sequence[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest kept prefix of ``ids`` that leaves at least one token to compute (its next
        token's logits come from that one): (length, per-layer keys and values) or (0, None)."""
        self.lookups += 1
        best, entry_key = 0, None
        for key in self.entries:
            n = shared_length(key, ids)
            if n > best:
                best, entry_key = n, key
        best = min(best, len(ids) - 1)
        if best < MIN_SHARED or entry_key is None:
            return 0, None
        self.entries.move_to_end(entry_key)
        self.hits += 1
        self.reused_tokens += best
        return best, self.entries[entry_key]

    def keep(self, ids: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a computed prompt (``layers`` are copies the cache now owns). A kept prompt that is a
        prefix of this one is replaced by it; the least recently used go when over budget."""
        key = tuple(ids)
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.budget or len(key) < MIN_SHARED:
            return
        for old in [k for k in self.entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(old)
        self.entries[key] = layers
        self.bytes += size
        while self.bytes > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        layers = self.entries.pop(key)
        self.bytes -= sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)

    def info(self) -> dict[str, float | int]:
        return {
            "prompts_kept": len(self.entries),
            "mb": round(self.bytes / 2**20, 1),
            "budget_mb": round(self.budget / 2**20, 1),
            "lookups": self.lookups,
            "hits": self.hits,
            "reused_tokens": self.reused_tokens,
        }
