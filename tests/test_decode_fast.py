"""The LM head's dtype is chosen by timing on this CPU, never assumed (fast: no model)."""

from __future__ import annotations

import torch

from app.engine.decode import choose_head_dtype, cpu_flags


def test_the_head_dtype_is_the_faster_one_measured_here() -> None:
    head = torch.randn(64, 512)
    chosen, timing = choose_head_dtype(head, max_rows=4, reps=2)
    assert set(timing) == {"float32", "bfloat16"} and all(v > 0 for v in timing.values())
    assert chosen == min(timing, key=timing.__getitem__)


def test_cpu_flags_are_a_list_of_known_names() -> None:
    flags = cpu_flags()
    assert isinstance(flags, tuple) and set(flags) <= {
        "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"
    }  # fmt: skip
