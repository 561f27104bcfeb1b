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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from app.engine import Engine
    from benchmarks.common import decode_rates, heldout_prompts, report

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    engine = Engine.load(Path(args.model))
    rates = decode_rates(engine, heldout_prompts(engine, args.repeats), args.tokens, repeats=args.repeats)
    report(
        "single-stream decode",
        [
            {
                "model": args.model,
                "kernel": engine.kernel,
                "dtype": engine.info()["dtype"],
                "max_new_tokens": args.tokens,
                "tok_s_median": statistics.median(rates),
                "tok_s_best": max(rates),
            }
        ],
    )


if __name__ == "__main__":
    main()
