"""Single-request decode speed of a checkpoint through the service's own engine, on each decode path:
the model's own forward (the reference), the static step eager, the static step compiled.

    python benchmarks/single_stream.py [--model model_artifacts/default] [--tokens 128] [--repeats 5]

Greedy decoding of held-out questions; tokens/s is generated tokens over wall time for the whole
request (prompt included), best and median of the repeats, and whether each path produced the
reference's tokens on every prompt.
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
    from app.engine.base import GenerationJob, SamplingParams
    from app.engine.local import Engine
    from benchmarks.common import decode_rates, heldout_prompts, report

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    rows, reference = [], None
    for path in ("model forward", "static eager", "static compiled"):
        engine = Engine.load(Path(args.model))
        if path != "model forward":
            engine.use_static_decoder(1, compile=path.endswith("compiled"), lm_head="float32")
        prompts = heldout_prompts(engine, args.repeats)
        rates = decode_rates(engine, prompts, args.tokens, repeats=args.repeats)
        tokens = [engine.generate([GenerationJob(ids, SamplingParams(args.tokens))])[0].token_ids for ids in prompts]
        reference = reference or tokens
        rows.append(
            {
                "decode path": path,
                "kernel": engine.kernel,
                "max_new_tokens": args.tokens,
                "tok_s_median": statistics.median(rates),
                "tok_s_best": max(rates),
                "same tokens as the model forward": f"{sum(a == b for a, b in zip(tokens, reference, strict=True))}"
                f"/{len(prompts)}",
            }
        )
    for row in rows:
        row["x model forward"] = row["tok_s_median"] / rows[0]["tok_s_median"]
    report("single-stream decode by path", rows)


if __name__ == "__main__":
    main()
