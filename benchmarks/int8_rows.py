"""The ``int8`` kernel (FBGEMM's int8 GEMM with per-row activation scales) with its scaling in C++
(``medask_native::int8_rows``, the shipped path where the native library is built) against the same
operations from Python (``app.engine.kernels._int8_rows``, the path without the library).

Both give the same outputs bit for bit (``tests/fast/engine/test_native.py``), so the only question is time:
two static decoders of the checkpoint with every projection and the LM head on ``int8``, one per path,
timed in turns for several rounds (the least time of each kept: drift only adds time): the compiled step
at 1 and 16 rows (the 16-row step is what serving 16 users runs), and a prompt of 210 tokens after a kept
prefix of 60 (an ``/ask`` prompt past the role's system prompt).

    python benchmarks/int8_rows.py [--model model_artifacts/default] [--rounds 5]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app.engine import kernels
from app.engine.local import Engine
from benchmarks.common import native_bench_args, report


def least_ms(call: Callable[[], object], calls: int) -> float:
    for _ in range(3):
        call()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> None:
    args = native_bench_args()
    forced = {"lm_head": "int8", "decode_weights": "int8", "prompt_weights": "int8", "kv_cache": "float16"}
    decoders = {}
    for path, native_rows in (("c++", True), ("python", False)):
        engine = Engine.load(Path(args.model))
        with mock.patch.object(kernels, "_native_rows", lambda on=native_rows: on):
            engine.use_static_decoder(16, compile=True, **forced)
        decoders[path] = engine.decoder
    ids = list(range(100, 370))
    cases = {
        "compiled step, 1 row": (lambda d: d.decode([5], [300]), 200),
        "compiled step, 16 rows": (lambda d: d.decode(list(range(16)), [300] * 16), 100),
        "prompt, 210 tokens after 60 kept": (lambda d: d.extend(0, ids[60:270], 60), 20),
    }
    with torch.inference_mode():
        same = torch.equal(decoders["c++"].extend(0, ids, 0), decoders["python"].extend(0, ids, 0))
        best: dict[tuple[str, str], float] = {}
        for _ in range(args.rounds):
            for case, (call, calls) in cases.items():
                for path, d in decoders.items():
                    t = least_ms(lambda d=d, call=call: call(d), calls)
                    best[case, path] = min(best.get((case, path), t), t)
    rows = [
        {
            "case": case,
            "c++ ms": round(best[case, "c++"], 3),
            "python ms": round(best[case, "python"], 3),
            "python / c++": round(best[case, "python"] / best[case, "c++"], 2),
        }
        for case in cases
    ]
    report(
        "int8 kernel: per-row scaling in C++ vs from Python (least ms over rounds)",
        rows,
        {"rounds": args.rounds, "same_prompt_logits": same},
    )


if __name__ == "__main__":
    main()
