"""KV-cache bookkeeping of the decode batch on made-up caches: no model (fast)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from app.engine.batch import merge, select_rows


def cache(rows: list[list[float]], layers: int = 2) -> tuple[DynamicCache, torch.Tensor]:
    """A cache whose every key/value vector holds its row's token values, left-padded with 0."""
    width = max(len(r) for r in rows)
    keys = torch.zeros(len(rows), 1, width, 2)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        keys[i, 0, width - len(r) :, :] = torch.tensor(r).unsqueeze(-1)
        mask[i, width - len(r) :] = 1
    c = DynamicCache()
    for layer in range(layers):
        c.update(keys.clone(), keys.clone() + 100, layer)
    return c, mask


def row_values(c: DynamicCache, mask: torch.Tensor, i: int, layer: int = 0) -> list[float]:
    used = mask[i].bool()
    return c.layers[layer].keys[i, 0, used, 0].tolist()


def test_merge_left_pads_both_sides_and_keeps_every_row() -> None:
    c1, m1 = cache([[1, 2, 3], [4, 5]])
    c2, m2 = cache([[7, 8, 9, 10, 11]])
    merged, mask = merge(c1, m1, c2, m2)
    assert mask.shape == (3, 5)
    assert [row_values(merged, mask, i) for i in range(3)] == [[1, 2, 3], [4, 5], [7, 8, 9, 10, 11]]
    for layer in merged.layers:
        assert layer.keys.shape == layer.values.shape == (3, 1, 5, 2)
        used = mask[:, None, :, None].expand_as(layer.keys).bool()
        assert torch.equal(layer.values[used], layer.keys[used] + 100)  # keys and values moved together


def test_select_keeps_rows_in_order_and_trims_padding_no_row_needs() -> None:
    c, mask = cache([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]])
    kept, kmask = select_rows(c, mask, [2, 1])
    assert kmask.shape == (2, 3)  # the 5-token row left: two padding columns go
    assert [row_values(kept, kmask, i) for i in range(2)] == [[8, 9, 10], [6, 7]]
    assert all(layer.keys.shape[0] == 2 and layer.keys.shape[2] == 3 for layer in kept.layers)


def test_merge_then_select_round_trip() -> None:
    c1, m1 = cache([[1, 2]])
    c2, m2 = cache([[3, 4, 5, 6]])
    merged, mask = merge(c1, m1, c2, m2)
    back, bmask = select_rows(merged, mask, [0])
    assert bmask.tolist() == [[1, 1]] and row_values(back, bmask, 0) == [1, 2]
