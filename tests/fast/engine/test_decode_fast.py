"""The decode step without a model: the LM head's dtype is chosen by timing on this CPU, never assumed;
models the static step does not cover are named; a cache too large is never allocated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from app.engine import kernels
from app.engine.decode import MAX_STATIC_CACHE_BYTES, cache_bytes, cpu_flags, supports
from app.engine.layers import choose_head


def test_the_head_kernel_is_the_fastest_one_measured_here() -> None:
    head = torch.randn(64, 512)
    small, large, timing = choose_head(head, max_rows=8, reps=2)
    runs_here = {k for k in ("float32", "bfloat16", "float16", "float16-avx2") if kernels.available(k) is None}
    for kind, chosen in (("small", small), ("large", large)):
        assert set(timing[kind]) == runs_here and all(v > 0 for v in timing[kind].values())
        assert chosen == min(timing[kind], key=timing[kind].__getitem__)


def test_a_head_of_two_kernels_gives_each_its_rows() -> None:
    """One row through one kernel, more than SMALL_ROWS through the other: each row's logits are those
    of its own kernel (float32 exact, bfloat16 rounded), in a compiled graph too."""
    from app.engine.layers import SMALL_ROWS, Head

    weight = torch.randn(40, 64)
    head, exact = Head(weight, "float32", "bfloat16"), Head(weight, "float32")
    few, many = torch.randn(SMALL_ROWS, 64), torch.randn(SMALL_ROWS + 1, 64)
    compiled = torch.compile(head.__call__, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for run in (head, compiled):
            assert torch.equal(run(few), exact(few))
            assert not torch.equal(run(many), exact(many))
            assert torch.allclose(run(many), exact(many), rtol=2e-2, atol=2e-1)


def test_cpu_flags_are_a_list_of_known_names() -> None:
    flags = cpu_flags()
    assert isinstance(flags, tuple) and set(flags) <= {
        "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "gpt2"}, "model type"),
        ({"model_type": "llama", "attention_bias": True}, "biased"),
        ({"model_type": "llama", "sliding_window": 4096}, "sliding window"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn"}}, "rope type"),
    ],
)
def test_models_the_static_step_does_not_cover_are_named(config: dict, reason: str) -> None:
    assert reason in (supports(SimpleNamespace(config=SimpleNamespace(**config))) or "")
    assert supports(SimpleNamespace(config=SimpleNamespace(model_type="llama"))) is None


def test_a_static_cache_too_large_to_allocate_is_not_allocated() -> None:
    """Llama-2-7B (32 layers, 32 heads of 128, 4,096 positions) on a CPU: 16 rows would need 64 GiB."""
    llama2 = SimpleNamespace(
        num_attention_heads=32, num_hidden_layers=32, hidden_size=4096, max_position_embeddings=4096
    )
    assert cache_bytes(llama2, 16) == 64 << 30 > MAX_STATIC_CACHE_BYTES
    assert cache_bytes(llama2, 1) < MAX_STATIC_CACHE_BYTES
