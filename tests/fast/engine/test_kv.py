"""The float16 KV cache's decode attention (app/engine/native/attention.cpp, through app.engine.kv) without a
model: torch's attention over the same float16 values read back in float32, for every head size it covers,
grouped-query heads, a row at position 0 and one at the context's end; a compiled graph calls it; bad
input is refused with a reason; the choice at start is the fastest admitted dtype."""

from __future__ import annotations

import pytest
import torch

from app.engine import kv, native


@pytest.fixture(scope="module")
def built() -> None:
    if native.cpu_lacks():
        pytest.skip(f"this CPU lacks {native.cpu_lacks()}: a float16 cache is never a candidate here")
    assert native.load() is None, native.load()  # `make install` builds the library


def cache(slots: int, kv_heads: int, context: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(slots, kv_heads, context, dim, generator=g).half() for _ in range(2))  # type: ignore[return-value]


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 8, 64), (4, 4, 32), (8, 2, 128), (6, 3, 64)])
def test_half_attention_is_torchs_attention_over_the_same_values(heads: int, kv_heads: int, dim: int) -> None:
    context = 300
    keys, values = cache(5, kv_heads, context, dim)
    pos = torch.tensor([0, 17, context - 1, 130])  # rows 0..3 in slots 0..3; slot 4 unused
    q = torch.randn(4, heads, dim)
    got = kv.attend_half(q, keys, values, pos)
    want = kv.attend_float(q, keys[:4].float(), values[:4].float(), pos, gqa=heads != kv_heads)
    assert got.shape == (4, heads, dim) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)
    # a row sees its own positions only: what lies beyond pos changes nothing
    keys[1, :, 18:] = 1e4
    assert torch.equal(kv.attend_half(q, keys, values, pos)[1], got[1])


@pytest.mark.usefixtures("built")
def test_half_attention_runs_inside_a_compiled_graph() -> None:
    keys, values = cache(2, 8, 64, 64)
    pos = torch.tensor([5, 40])

    def step(q: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        keys[torch.arange(2), :, pos] = new.half()  # written in place, then read, as the decode step does
        return kv.attend_half(q, keys, values, pos) * 2

    q, new = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    want = step(q, new)
    with torch.inference_mode():
        got = torch.compile(step, fullgraph=True, dynamic=True)(q, new)
    assert torch.allclose(got, want)


@pytest.mark.usefixtures("built")
def test_bad_input_is_refused_with_a_reason() -> None:
    keys, values = cache(2, 8, 64, 64)
    q = torch.randn(1, 8, 64)
    with pytest.raises(RuntimeError, match="pos: within the context"):
        kv.attend_half(q, keys, values, torch.tensor([64]))
    with pytest.raises(RuntimeError, match=r"keys: .* float16"):
        kv.attend_half(q, keys.float(), values, torch.tensor([3]))
    assert "head size 80" in (kv.half_unavailable(80) or "")


def test_the_choice_is_the_least_time_a_token() -> None:
    timing = {"small": {"float32": 0.30, "float16": 0.10}, "large": {"float32": 4.0, "float16": 1.5}}
    assert kv.fastest(timing, 16) == "float16"
    timing = {"small": {"float32": 0.10, "float16": 0.12}, "large": {"float32": 1.6, "float16": 1.5}}
    assert kv.fastest(timing, 16) == "float32"  # 0.10 + 0.1 against 0.12 + 0.094


def test_float16_is_admitted_only_within_the_bound() -> None:
    nll = {"float32": 1000.0, "float16": 1003.0}
    assert kv.check(nll.__getitem__, 0.5) == {"change_pct": 0.3, "admitted": True}
    assert kv.check(nll.__getitem__, 0.2)["admitted"] is False


def test_a_compiled_step_keeps_the_guards_on_its_arguments_only() -> None:
    """Dynamo's guards on the decoder (its weights, kernels and caches, fixed at start) and on module globals
    go; those on the arguments, the shapes' relations and global state stay."""
    from types import SimpleNamespace

    from app.engine.compiled import argument_guards

    names = ["n", "tok", "pos", "attended", "", "self.keys[0]", "type(self.layers[0][1]).__call__", "G['torch']"]
    kept = argument_guards([SimpleNamespace(name=n) for n in names])
    assert [n for n, k in zip(names, kept, strict=True) if k] == ["n", "tok", "pos", "attended", ""]
