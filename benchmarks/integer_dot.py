"""The 8-bit kernels' byte products: AVX-512 VNNI's vpdpbusd against AVX2's maddubs, madd and add.

Both paths give the same outputs bit for bit (``tests/fast/engine/test_native.py``), so the only question is
time: each of MedAsk's two 8-bit kernels (``int4x8-avx2``: the 4-bit weights times 8-bit activations;
``int8-avx2``: int8 weights, the LM head's kernel) on the checkpoint's own layer shapes, at 1, 4 and 16 rows,
the two instruction paths in turns for several rounds, the least time of each kept (drift only adds time).
Random weights of those shapes: the time does not depend on the values. Needs a CPU with AVX-512 VNNI.

    python benchmarks/integer_dot.py [--model model_artifacts/default] [--rounds 5]
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app.engine import native
from app.engine.decode import cpu_flags
from benchmarks.common import native_bench_args, report

GROUP = 128


def least_ms(call: Callable[[], torch.Tensor], calls: int = 200) -> float:
    for _ in range(10):
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return 1000 * (time.perf_counter() - start) / calls


def main() -> None:
    args = native_bench_args()
    if native.integer_dot("auto") != "vnni":
        sys.exit("this CPU lacks AVX-512 VNNI: the 8-bit kernels have one path here")
    config = json.loads((Path(args.model) / "config.json").read_text())
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    qkv = hidden + 2 * hidden * kv_heads // heads
    shapes = {"qkv": (qkv, hidden), "gate_up": (2 * inner, hidden), "down": (hidden, inner), "lm_head": (vocab, hidden)}
    ops = torch.ops.medask_native
    torch.manual_seed(0)
    rows = []
    for name, (out, n) in shapes.items():
        groups = n // GROUP
        w4 = torch.randint(0, 256, (out, n // 2), dtype=torch.uint8)
        scale, offset = torch.rand(out, groups), torch.randn(out, groups)
        w8, w8_scale = torch.randint(-127, 128, (out, n), dtype=torch.int8), torch.rand(out)
        for m in (1, 4, 16):
            x = torch.randn(m, n)
            calls = {
                "int4x8-avx2": functools.partial(ops.q4q8_linear, x, w4, scale, offset, GROUP),
                "int8-avx2": functools.partial(ops.i8_linear, x, w8, w8_scale, GROUP),
            }
            best: dict[tuple[str, str], float] = {}
            for _ in range(args.rounds):
                for path in ("avx2", "vnni"):
                    native.integer_dot(path)
                    for kernel, call in calls.items():
                        t = least_ms(call)
                        best[kernel, path] = min(best.get((kernel, path), t), t)
            for kernel in calls:
                avx2, vnni = best[kernel, "avx2"], best[kernel, "vnni"]
                rows.append(
                    {
                        "kernel": kernel,
                        "layer": f"{name} {out}x{n}",
                        "rows": m,
                        "avx2_ms": round(avx2, 4),
                        "vnni_ms": round(vnni, 4),
                        "vnni_speedup": round(avx2 / vnni, 3),
                    }
                )
            print(rows[-2:], flush=True)
    native.integer_dot("auto")
    report("8-bit kernels: VNNI vs AVX2 byte products", rows, {"cpu_flags": list(cpu_flags())})


if __name__ == "__main__":
    main()
