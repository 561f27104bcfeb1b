"""Kept prompt prefixes: the longest shared prefix is found, a prompt keeps at least one token to
compute, short prefixes are not worth a copy, and memory stays inside the budget."""

from __future__ import annotations

import torch

from app.engine.prefix import MIN_SHARED, PrefixCache, shared_length


def kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((2, n, 4), float(i)), torch.full((2, n, 4), -float(i))) for i in range(layers)]


def size(n: int, layers: int = 2) -> int:
    return 2 * layers * 2 * n * 4 * 4


def test_the_longest_shared_prefix_is_found() -> None:
    cache = PrefixCache(1 << 20)
    system = list(range(100, 140))
    cache.keep([*system, 1, 2, 3], kv(43))
    cache.keep(system[:20] + [9] * 30, kv(50))
    n, layers = cache.find([*system, 7, 7])
    assert n == 40 and layers is not None and layers[0][0].shape == (2, 43, 4)
    assert cache.info()["hits"] == 1 and cache.info()["reused_tokens"] == 40


def test_a_repeated_prompt_leaves_its_last_token_to_compute() -> None:
    cache = PrefixCache(1 << 20)
    ids = list(range(50))
    cache.keep(ids, kv(50))
    assert cache.find(ids)[0] == 49  # the next token's logits come from the last prompt token


def test_short_prefixes_are_recomputed() -> None:
    cache = PrefixCache(1 << 20)
    cache.keep(list(range(60)), kv(60))
    assert cache.find(list(range(MIN_SHARED - 1)) + [999] * 10) == (0, None)
    assert shared_length([1, 2, 3], [1, 2, 4]) == 2 and shared_length([], [1]) == 0


def test_memory_stays_inside_the_budget_least_recently_used_first() -> None:
    cache = PrefixCache(2 * size(40))
    a, b, c = ([k] * 40 for k in (1, 2, 3))
    cache.keep(a, kv(40))
    cache.keep(b, kv(40))
    assert cache.find([*a, 5])[0] == 40  # a is now the most recently used
    cache.keep(c, kv(40))
    assert cache.bytes <= cache.budget and len(cache.entries) == 2
    assert cache.find([*b, 5]) == (0, None) and cache.find([*a, 5])[0] == 40
    cache.keep(list(range(1000)), kv(1000))  # larger than the whole budget: not kept
    assert cache.bytes <= cache.budget


def test_a_kept_prefix_of_a_new_prompt_is_replaced_by_it() -> None:
    cache = PrefixCache(1 << 20)
    cache.keep(list(range(30)), kv(30))
    cache.keep(list(range(45)), kv(45))
    assert list(cache.entries) == [tuple(range(45))] and cache.bytes == size(45)
