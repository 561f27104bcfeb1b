"""The static step's kernels without a model: each computes the same product as float32 within its
rounding, a kernel missing here is named (never silently used), FBGEMM's packed weights reach the
compiled step through the custom op and leave its table with their owner."""

from __future__ import annotations

import gc

import pytest
import torch

from app.engine import kernels
from app.engine.layers import Head

# relative error of each kernel against float32 on random data (bfloat16 rounds activations too,
# int8 quantizes them to 7 bits per call)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3, "int8": 5e-2}


@pytest.mark.parametrize("kernel", ["float32", "bfloat16", "float16", "int8"])
def test_every_kernel_computes_the_float32_product(kernel: str) -> None:
    assert kernels.available(kernel) is None, kernels.available(kernel)
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64) * 0.1, torch.randn(5, 64)
    packed = kernels.Packed(kernel, weight)
    want = torch.nn.functional.linear(x, weight)
    got = packed(x)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    assert (got - want).norm() / want.norm() < TOLERANCE[kernel]
    assert packed.bytes == kernels.nbytes(kernel, 96, 64)


def test_an_unknown_kernel_is_named() -> None:
    with pytest.raises(kernels.KernelError, match="unknown kernel 'int3'"):
        kernels.Packed("int3", torch.randn(4, 4))
    assert "int3" in (kernels.available("int3") or "")


def test_fbgemm_weights_leave_the_table_with_their_owner() -> None:
    before = len(kernels._TABLE)
    packed = kernels.Packed("float16", torch.randn(8, 16))
    assert len(kernels._TABLE) == before + 1
    del packed
    gc.collect()
    assert len(kernels._TABLE) == before


def test_fbgemm_kernels_run_inside_a_compiled_graph() -> None:
    """TorchScript packed weights break torch.compile's graph; the custom op keeps it whole."""
    head = Head(torch.randn(32, 16), "float16")
    compiled = torch.compile(lambda x: head(torch.relu(x)) * 2, fullgraph=True, dynamic=True)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.allclose(compiled(x), head(torch.relu(x)) * 2)


def test_the_fastest_candidate_wins_and_ties_go_to_the_reference() -> None:
    assert kernels.fastest({"int4": 2.0, "float16": 1.0, "float32": 3.0}, kernels.AUTO_KERNELS) == "float16"
    assert kernels.fastest({"int4": 1.0, "float16": 1.0}, kernels.AUTO_KERNELS) == "int4"
    # 8-bit activations change the arithmetic: never an automatic choice without the start-up check
    assert not set(kernels.EIGHT_BIT) & set(kernels.AUTO_KERNELS) and set(kernels.EIGHT_BIT) <= set(kernels.KERNELS)
    # the check runs the 4-bit ones last, with an 8-bit head admitted before them
    assert [k for k in kernels.EIGHT_BIT if k in kernels.FOUR_BIT] == list(kernels.EIGHT_BIT[-1:])


def test_every_kernel_can_be_named_in_the_settings() -> None:
    from typing import get_args

    from app.settings import WeightKernel

    assert set(get_args(WeightKernel)) == {"auto", *kernels.KERNELS}


def test_an_int8_row_does_not_depend_on_its_batch_mates() -> None:
    """Activations are quantized per row on a fixed grid: a row alone or beside a row a thousand times
    larger gives the same numbers (FBGEMM alone would quantize both on the large row's scale)."""
    torch.manual_seed(1)
    packed = kernels.Packed("int8", torch.randn(48, 32) * 0.1)
    row, loud = torch.randn(1, 32), torch.randn(1, 32) * 1000
    alone = packed(row)
    together = packed(torch.cat([row, loud, row * 0.001]))
    assert torch.equal(together[0:1], alone)
    want = row @ packed_weight(packed).t()
    assert (alone - want).norm() / want.norm() < TOLERANCE["int8"]


def packed_weight(packed: kernels.Packed) -> torch.Tensor:
    """The int8 weights FBGEMM holds, as float32 (per-channel scales applied)."""
    weight, _ = torch.ops.quantized.linear_unpack(packed.fbgemm)
    return weight.dequantize()


def test_interleaved_timing_keeps_each_candidates_least_time() -> None:
    """A candidate that lands on a busy moment in one round is not judged by it (noise only adds time),
    and one far slower than the best is timed once, not again."""
    import time

    calls = {"a": 0, "b": 0, "c": 0}

    def a() -> None:  # busy in its first round, then the fastest
        calls["a"] += 1
        time.sleep(0.004 if calls["a"] <= 6 else 0.0005)

    def b() -> None:
        calls["b"] += 1
        time.sleep(0.0015)

    def c() -> None:
        calls["c"] += 1
        time.sleep(0.02)

    got = kernels.time_interleaved({"a": a, "b": b, "c": c}, reps=5, rounds=3)
    assert kernels.fastest(got, ["b", "a", "c"]) == "a"
    assert got["a"] < got["b"] < got["c"]
    assert calls["c"] == 1  # its first call was past 3x the best: never timed further
