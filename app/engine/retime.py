"""The start-up timing that settles auto's one-row decode kernel and prompt kernel over whole steps.

``app.engine.layers.choose_paths`` times every kernel on one projection (milliseconds for all of them). That
ranks the near candidates badly in two ways, both measured: one projection misses what every layer's weights
together cost in the CPU's caches (AVX2 machine: float16 first on one projection, where a whole one-row step ran
25% faster through int4-avx2), and the work between the projections (Zen 4: bfloat16 and FBGEMM int8 prompts
flipped between starts on one projection, where whole prefills took 35 and 27-28 ms). So the few kernels
nearest the best are timed again over whole eager one-row steps, or whole prefills of a PROMPT_PROBE_ROWS-token
prompt, after the KV cache is chosen and allocated: beside the start-up checks' one-slot float32 cache, torch's
attention was half of every step and the one-row choice flipped between starts (Zen 4: int4 picked at 1.63 ms
over int8-avx2's 2.15, where steps as served took 1.46-1.93 against 1.14-1.22).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from app.engine import kernels
from app.engine.layers import PROMPT_PROBE_ROWS, Projection


class Decoder(Protocol):
    """What the retime uses of ``app.engine.decode.StaticDecoder`` (named here, not imported: decode imports this)."""

    weight_timing: dict[str, dict[str, float]]
    decode_small: str
    prompt_weights: str
    context: int

    def step(self, tok: torch.Tensor, pos: torch.Tensor, n: int, attended: int) -> torch.Tensor: ...
    def extend(self, slot: int, ids: Sequence[int], start: int, every: bool = False) -> torch.Tensor: ...
    def _probe_step(self) -> tuple[Any, ...]: ...


# kernels within this factor of the best on one projection (at most STEP_RETIME_MOST of them, the fastest there)
# are timed again, in rounds (8: with 4, one busy moment of a 2-core machine could pick; a round is about 30 ms)
STEP_RETIME_WITHIN, STEP_RETIME_MOST, STEP_RETIME_ROUNDS = 3.0, 3, 8
# prefills are timed in fewer rounds: each takes about as long as a round of one-row steps
PROMPT_RETIME_ROUNDS = 4


@torch.inference_mode()
def retime(decoder: Decoder, projections: Sequence[Projection], kind: str) -> str:
    """The ``small`` (one-row decode) or ``prompt`` kernel for ``decoder``, timed as served; its times kept in
    ``decoder.weight_timing["<kind>_step"]``. Fewer than two near candidates: the current choice stands. Leaves
    the projections' paths pointing at the last candidate timed: the caller sets them (``Projection.use``)."""
    timings = decoder.weight_timing.get(kind, {})
    current = decoder.decode_small if kind == "small" else decoder.prompt_weights
    best = min(timings.values(), default=0.0)
    near = sorted((t, k) for k, t in timings.items() if t <= STEP_RETIME_WITHIN * best)
    contenders = [k for _, k in near[:STEP_RETIME_MOST]]
    if len(contenders) < 2:
        return current
    for proj in projections:  # each within the dense budget; the ones not chosen are freed by use()
        for kernel in contenders:
            proj.prepare(kernel)
    prompt = [1 + i % 100 for i in range(min(PROMPT_PROBE_ROWS, decoder.context))]  # slot 0: scratch at start

    def run_through(kernel: str) -> None:
        for proj in projections:
            if kind == "small":
                proj.small_path = proj.large_path = kernel
            else:
                proj.prompt_path = kernel
        if kind == "small":
            decoder.step(*decoder._probe_step())
        else:
            decoder.extend(0, prompt, 0)

    calls = {k: (lambda k=k: run_through(k)) for k in contenders}
    if kind == "small":
        ms = kernels.time_interleaved(calls, reps=5, rounds=STEP_RETIME_ROUNDS)
    else:
        ms = kernels.time_interleaved(calls, reps=1, rounds=PROMPT_RETIME_ROUNDS)
    decoder.weight_timing[f"{kind}_step"] = ms
    return kernels.fastest(ms, contenders)
