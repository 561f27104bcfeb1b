"""Single-request decode speed of a checkpoint through the service's own engine.

    python benchmarks/single_stream.py [--model model_artifacts/default] [--tokens 128] [--repeats 3]

Greedy decoding of held-out questions; tokens/s is generated tokens over wall
time for the whole request (prefill included), best and median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from app.engine import Engine, GenerationJob, SamplingParams
    from benchmarks.common import report
    from training.data import heldout_rows, role_for_case

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    engine = Engine.load(Path(args.model))
    rows = heldout_rows()[: args.repeats]
    engine.generate([GenerationJob(engine.encode_question(rows[0].prompt, "General Practitioner"), SamplingParams(8))])
    rates, counts = [], []
    for row in rows:
        ids = engine.encode_question(row.prompt, role_for_case(row.prompt))
        t0 = time.perf_counter()
        res = engine.generate([GenerationJob(ids, SamplingParams(max_new_tokens=args.tokens))])[0]
        dt = time.perf_counter() - t0
        rates.append(len(res.token_ids) / dt)
        counts.append(len(res.token_ids))
    report(
        "single-stream decode",
        [
            {
                "model": args.model,
                "kernel": engine.kernel,
                "dtype": engine.info()["dtype"],
                "tokens_per_request": statistics.mean(counts),
                "tok_s_median": statistics.median(rates),
                "tok_s_best": max(rates),
            }
        ],
    )


if __name__ == "__main__":
    main()
