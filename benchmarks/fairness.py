"""Fairness under a flood: a short request's latency while another client floods the server with
long generations, with the scheduling policy's protections off ("before": FIFO admission, no
token budget, no per-key share) and on ("after": the defaults), side by side in one run.

    python benchmarks/fairness.py [--model model_artifacts/default] [--flood 32] [--flood-tokens 900]
                                  [--short 16] [--short-tokens 8]

The flood client (key ``flood``) sends ``--flood`` concurrent /v1/completions requests of
``--flood-tokens`` tokens; meanwhile the short client (key ``short``) sends ``--short``
requests of ``--short-tokens`` tokens one after another. Reported: the short requests'
p50/p99 latency and errors, the flood's completion and its 429s. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import report  # noqa: E402
from benchmarks.serve_load import start_medask, stop  # noqa: E402

# both servers: two keys, no retrieval (the flood and the short requests cost only decoding)
COMMON = {"MEDASK_API_KEYS": "flood,short", "MEDASK_EVIDENCE": "false", "MEDASK_QUEUE_SIZE": "64"}
CONFIGS = {
    # the old scheduler's behaviour: FIFO, rows only, one key may fill the queue
    "before (protections off)": {"MEDASK_KEY_QUEUE_SHARE": "1", "MEDASK_MAX_BATCH_TOKENS": str(10**9)},
    "after (defaults)": {},
}


async def one(client: httpx.AsyncClient, base: str, key: str, tokens: int, prompt: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        r = await client.post(
            f"{base}/v1/completions",
            json={"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True},
            headers={"Authorization": f"Bearer {key}"},
            timeout=180,
        )
        status = r.status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - t0


async def scenario(base: str, args: argparse.Namespace) -> dict[str, object]:
    prompt = "A 45-year-old woman presents with fatigue, weight gain and cold intolerance. The most likely"
    async with httpx.AsyncClient() as client:
        flood = [asyncio.create_task(one(client, base, "flood", args.flood_tokens, prompt)) for _ in range(args.flood)]
        await asyncio.sleep(1.0)  # the flood is queued and decoding
        shorts = []
        for _ in range(args.short):
            shorts.append(await one(client, base, "short", args.short_tokens, prompt))
            await asyncio.sleep(0.25)
        flood_out = await asyncio.gather(*flood)
    lat = sorted(t for s, t in shorts if s == 200)
    return {
        "short_ok": len(lat),
        "short_errors": sum(1 for s, _ in shorts if s != 200),
        "short_p50_s": statistics.median(lat) if lat else None,
        "short_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "flood_ok": sum(1 for s, _ in flood_out if s == 200),
        "flood_429": sum(1 for s, _ in flood_out if s == 429),
        "flood_wall_s": max(t for _, t in flood_out),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--flood", type=int, default=32)
    p.add_argument("--flood-tokens", type=int, default=900)
    p.add_argument("--short", type=int, default=16)
    p.add_argument("--short-tokens", type=int, default=8)
    args = p.parse_args()
    rows = []
    for name, env in CONFIGS.items():
        target = start_medask(args.model, True, Path(f"/tmp/medask-fairness-{len(rows)}.log"), {**COMMON, **env})
        if target.error:
            raise SystemExit(f"server did not start: {target.error}")
        try:
            rows.append({"scheduler": name, **asyncio.run(scenario(target.base, args))})
        finally:
            stop(target)
    report("short-request latency under a long-generation flood", rows, {"args": vars(args)})


if __name__ == "__main__":
    main()
