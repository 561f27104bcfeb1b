"""Where should a route tokenize? On the event loop with its own tokenizer instance (what the
service does), or by sending the text to the worker thread that owns the model's tokenizer?
Measured while a decode batch is running, as it is under load.

    python benchmarks/tokenizer_path.py [--model model_artifacts/default] [--rows 8] [--tokens 128] [--n 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def measure(engine: object, scheduler: object, args: argparse.Namespace) -> list[dict[str, object]]:
    from app.engine.base import GenerationJob, SamplingParams
    from benchmarks.common import heldout_prompts

    prompts = heldout_prompts(engine, args.rows)
    text = "A 58-year-old man has crushing chest pain radiating to the left arm for 40 minutes, with sweating. " * 3
    front, worker = [], []
    for _ in range(args.n):
        batch = [scheduler.generate(GenerationJob(q, SamplingParams(args.tokens))) for q in prompts]
        await asyncio.sleep(0.3)  # the batch is decoding, as under load
        t0 = time.perf_counter()
        engine.encode(text)  # the route's own instance, on the event loop
        front.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await scheduler.call(lambda e: e.tokenizer(text, add_special_tokens=False)["input_ids"])
        worker.append(time.perf_counter() - t0)
        await asyncio.gather(*batch)
    rows = [
        {"path": "front tokenizer on the event loop", "median_ms": 1000 * statistics.median(front)},
        {"path": "sent to the worker thread", "median_ms": 1000 * statistics.median(worker)},
    ]
    for r in rows:
        r["ratio_vs_front"] = r["median_ms"] / rows[0]["median_ms"]
    return rows


def main() -> None:
    from app.engine.local import Engine
    from app.engine.scheduler import Scheduler
    from app.metrics import Metrics
    from benchmarks.common import report

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--n", type=int, default=5)
    args = p.parse_args()
    engine = Engine.load(Path(args.model))
    scheduler = Scheduler(engine, Metrics(), batching=True, max_batch_size=16, batch_wait_ms=8, queue_size=64)
    scheduler.start()
    try:
        rows = asyncio.run(measure(engine, scheduler, args))
    finally:
        scheduler.stop()
    report("tokenizing a prompt while a batch decodes", rows, {"args": vars(args)})


if __name__ == "__main__":
    main()
