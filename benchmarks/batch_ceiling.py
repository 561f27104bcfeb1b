"""What one decode batch can do on this machine: the engine alone (no HTTP, no
queue) decoding B held-out questions together, for B = 1, 4, 8, 16, 32.

    python benchmarks/batch_ceiling.py [--model model_artifacts/default] [--tokens 64] [--sizes 1 4 8 16 32]
                                       [--dtype auto float16 ...]

Generated tokens/s per batch size and its ratio to B=1: the most any batching
scheduler could get out of this model and these cores. It is the ceiling for
serve_load.py's "concurrency 16 vs the one-at-a-time baseline" ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.engine.local import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from app.engine.local import Engine
    from benchmarks.common import report

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", nargs="+", default=["auto"], help="activation dtypes to compare, e.g. float16 float32")
    args = p.parse_args()
    rows = []
    for dtype in args.dtype:
        rows += _measure(Engine.load(Path(args.model), dtype=dtype), args)
    report(f"decode ceiling by batch size ({args.tokens} new tokens, greedy, engine only)", rows)


def _measure(engine: Engine, args: argparse.Namespace) -> list[dict]:
    from benchmarks.common import decode_rates, heldout_prompts

    prompts = heldout_prompts(engine)
    rows = []
    for size in args.sizes:
        best = max(decode_rates(engine, prompts, args.tokens, batch=size, repeats=args.repeats))
        rows.append({"dtype": engine.info()["dtype"], "batch": size, "tok_s": best})
    for r in rows:
        r["ratio_vs_batch_1"] = r["tok_s"] / rows[0]["tok_s"]
    return rows


if __name__ == "__main__":
    main()
