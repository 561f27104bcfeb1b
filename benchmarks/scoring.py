"""/perplexity throughput: 64 held-out answers in one batched call against the
same 64 as single calls (sequential, then 16 at a time), on one MedAsk server.

    python benchmarks/scoring.py [--model model_artifacts/default] [--items 64] [--repeats 3]

Every call scores the gold answer given the role prompt and the question, the
same quantity as the held-out evaluation. The per-item perplexities of the
three ways must agree (they are the same math), which the script checks.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _item(row: object) -> dict[str, str]:
    from training.data import role_for_case

    return {"question": row.prompt, "answer": row.completion, "role": role_for_case(row.prompt)}  # type: ignore[attr-defined]


def batched(base: str, items: list[dict]) -> list[float]:
    r = httpx.post(f"{base}/perplexity", json={"items": items}, timeout=600)
    r.raise_for_status()
    return [x["perplexity"] for x in r.json()["results"]]


def sequential(base: str, items: list[dict]) -> list[float]:
    out = []
    with httpx.Client(timeout=600) as client:
        for item in items:
            r = client.post(f"{base}/perplexity", json=item)
            r.raise_for_status()
            out.append(r.json()["results"][0]["perplexity"])
    return out


def concurrent(base: str, items: list[dict], concurrency: int = 16) -> list[float]:
    async def run() -> list[float]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=600) as client:

            async def one(item: dict) -> float:
                async with sem:
                    r = await client.post(f"{base}/perplexity", json=item)
                    r.raise_for_status()
                    return r.json()["results"][0]["perplexity"]

            return list(await asyncio.gather(*(one(i) for i in items)))

    return asyncio.run(run())


def main() -> None:
    from benchmarks.common import report
    from benchmarks.serve_load import start_medask, stop
    from training.data import heldout_rows

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    items = [_item(r) for r in heldout_rows()[: args.items]]
    logs = ROOT / "runs" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    server = start_medask(args.model, True, logs / "scoring.log")
    if server.error:
        raise SystemExit(f"server did not start: {server.error}")
    ways = {
        "one batched call": batched,
        "single calls, sequential": sequential,
        "single calls, 16 concurrent": concurrent,
    }
    rows, ppl = [], {}
    try:
        batched(server.base, items[:4])  # warm-up
        for name, fn in ways.items():
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ppl[name] = fn(server.base, items)
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append(
                {
                    "way": name,
                    "items": len(items),
                    "seconds_median": statistics.median(times),
                    "items_s": len(items) / best,
                }
            )
    finally:
        stop(server)
    reference = ppl["one batched call"]
    worst = max(abs(a / b - 1) for way in ppl.values() for a, b in zip(way, reference, strict=True))
    base_rate = rows[1]["items_s"]
    for row in rows:
        row["ratio_vs_sequential"] = row["items_s"] / base_rate
    report(
        f"/perplexity scoring of {len(items)} held-out answers (items/s from the best of {args.repeats})",
        rows,
        {"max_relative_perplexity_difference_between_ways": worst},
    )
    print(f"\nper-item perplexities agree across the three ways within {worst:.2e} (relative)")


if __name__ == "__main__":
    main()
