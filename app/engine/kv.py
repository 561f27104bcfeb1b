"""The static decode step's KV cache dtype: float32 (torch's attention, the reference) or float16 (MedAsk's
C++ decode attention, ``app/engine/native/attention.cpp``), chosen on the machine it runs on.

At a decode step the attention reads every cached key and value once; at 16 rows of a few hundred
positions those bytes, not the arithmetic, set its time, and on the AVX2 machine torch's attention over
a float32 cache took as long as all the step's matrix products together. A float16 cache halves the
bytes (llama.cpp's default cache is float16 too), but torch's own attention on float16 is several times
slower than on float32 without native half arithmetic, so float16 goes with MedAsk's kernel, which widens
the values in registers and reads each row's own positions only. Prompts still run torch's attention,
over the cache read back in float32.

float16 rounds each key and value (11 significant bits): auto admits it, like the kernels of 8-bit
activations, only when at start it scores the probe text within the +0.5% bound (``check``), and keeps it
only when timed faster here (``time_caches``); a setting forces either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from app.engine import kernels

KV_CACHES = ("float32", "float16")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# head sizes MedAsk's attention kernel is compiled for
HALF_HEAD_DIMS = (32, 64, 128)
# positions, most rows and most bytes of the scratch caches timed at start
TIMED_POSITIONS = 256
TIMED_ROWS = 16
TIMED_BYTES = 128 << 20


def half_unavailable(head_dim: int) -> str | None:
    """Why a float16 cache cannot serve here (None: it can)."""
    if head_dim not in HALF_HEAD_DIMS:
        return f"head size {head_dim} (MedAsk's decode attention covers {', '.join(map(str, HALF_HEAD_DIMS))})"
    from app.engine import native

    return native.load()


def refuse(dtype: str, head_dim: int) -> str | None:
    """A KernelError for a cache setting that cannot run here; else why float16 cannot (None: it can)."""
    if dtype not in ("auto", *KV_CACHES):
        raise kernels.KernelError(f"unknown KV cache {dtype!r} (one of auto, {', '.join(KV_CACHES)})")
    why = half_unavailable(head_dim)
    if dtype == "float16" and why:
        raise kernels.KernelError(f"KV cache 'float16' cannot run here: {why}")
    return why


def attend_half(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Row r's query (heads, dim) against its slot r's float16 keys and values at positions 0..pos[r]."""
    return torch.ops.medask_native.decode_attention(q, keys, values, pos, q.shape[-1] ** -0.5)


def attend_float(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, gqa: bool
) -> torch.Tensor:
    """The same through torch's attention over a float32 cache (the reference; ``keys``, ``values``: the slots'
    first ``attended`` positions), masked beyond each row's pos."""
    n, attended = q.shape[0], keys.shape[2]
    visible = (torch.arange(attended, device=q.device)[None, :] <= pos[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], keys[:n], values[:n], attn_mask=visible, enable_gqa=gqa
    )
    return out[:, :, 0]


def time_caches(
    layers: int,
    rows: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    candidates: Sequence[str] = KV_CACHES,
    reps: int = 5,
) -> dict[str, dict[str, float]]:
    """Milliseconds of one decode step's attention (every layer; fewer where the scratch caches would pass
    TIMED_BYTES) at one row and at ``rows``, over TIMED_POSITIONS positions, for each candidate dtype.
    Every layer's cache, not one: one layer's fits in the CPU's caches, a step's does not."""
    per_layer = 2 * rows * kv_heads * TIMED_POSITIONS * head_dim * 4
    count = max(1, min(layers, TIMED_BYTES // per_layer))
    timing: dict[str, dict[str, float]] = {}
    caches = {
        k: [
            tuple(torch.randn(rows, kv_heads, TIMED_POSITIONS, head_dim).to(DTYPES[k]) for _ in range(2))
            for _ in range(count)
        ]
        for k in candidates
    }
    gqa = heads != kv_heads
    with torch.inference_mode():
        for kind, n in (("small", 1), ("large", rows)):
            q = torch.randn(n, heads, head_dim)
            pos = torch.full((n,), TIMED_POSITIONS - 1)

            def run(kv: str, q: torch.Tensor = q, pos: torch.Tensor = pos) -> None:
                for keys, values in caches[kv]:
                    if kv == "float16":
                        attend_half(q, keys, values, pos)
                    else:
                        attend_float(q, keys, values, pos, gqa)

            calls = {k: (lambda k=k: run(k)) for k in candidates}
            timing[kind] = {k: round(v, 4) for k, v in kernels.time_interleaved(calls, reps).items()}
    return timing


def fastest(timing: dict[str, dict[str, float]], rows: int) -> str:
    """The dtype of least time a token: one row's step plus a full batch's divided by its rows."""
    cost = {k: timing["small"][k] + timing["large"][k] / rows for k in timing["small"]}
    return min(cost, key=lambda k: (cost[k], KV_CACHES.index(k)))


def check(score: Callable[[str], float], bound_pct: float) -> dict[str, Any]:
    """``score(dtype)``: the probe text's negative log-likelihood with the cache in that dtype. float16 is
    admitted when it costs at most ``bound_pct`` percent."""
    reference, half = score("float32"), score("float16")
    change = 100 * (half / reference - 1)
    return {"change_pct": round(change, 4), "admitted": change <= bound_pct}
