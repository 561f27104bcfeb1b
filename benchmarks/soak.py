"""Soak: thousands of mixed requests against one server; does memory stay flat,
does every response keep its contract, do the gauges return to zero?

    python benchmarks/soak.py [--model model_artifacts/default] [--requests 5000] [--concurrency 8]

The mix: /ask (plain and streamed), /perplexity, /v1/chat/completions,
/v1/completions scoring, bad bodies (422/400/413), wrong keys (401) and
clients that hang up mid-request. The server's RSS is sampled after warm-up
and at the end; growth over 10% is reported as a failure. Any 5xx fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEY = "soak-key"
RSS_LIMIT = 0.10


def _requests(rows: list, n: int, seed: int) -> list[tuple[str, str, dict | bytes, dict]]:
    from training.data import role_for_case

    rng = random.Random(seed)
    auth = {"Authorization": f"Bearer {KEY}"}
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        q, role = row.prompt, role_for_case(row.prompt)
        kind = rng.choices(
            ["ask", "ask_stream", "score", "chat", "completion", "bad", "bad_json", "big", "no_key", "hangup"],
            weights=[35, 10, 15, 10, 5, 8, 3, 2, 7, 5],
        )[0]
        if kind == "ask":
            out.append((kind, "/ask", {"question": q, "role": role, "max_new_tokens": 8}, auth))
        elif kind == "ask_stream":
            out.append((kind, "/ask", {"question": q, "max_new_tokens": 8, "stream": True}, auth))
        elif kind == "score":
            out.append((kind, "/perplexity", {"question": q, "answer": row.completion, "role": role}, auth))
        elif kind == "chat":
            body = {"messages": [{"role": "system", "content": role}, {"role": "user", "content": q}], "max_tokens": 8}
            out.append((kind, "/v1/chat/completions", body, auth))
        elif kind == "completion":
            out.append(
                (
                    kind,
                    "/v1/completions",
                    {"prompt": row.completion[:400], "max_tokens": 0, "echo": True, "logprobs": 1},
                    auth,
                )
            )
        elif kind == "bad":
            out.append((kind, "/ask", {"question": "   ", "max_new_tokens": -1}, auth))
        elif kind == "bad_json":
            out.append((kind, "/ask", b'{"question": "x", ', auth))
        elif kind == "big":
            out.append((kind, "/ask", b"x" * 200_000, auth))
        elif kind == "no_key":
            out.append((kind, "/ask", {"question": q}, {"Authorization": "Bearer wrong"}))
        else:
            out.append((kind, "/ask", {"question": q, "max_new_tokens": 64}, auth))
    return out


async def _one(client: httpx.AsyncClient, base: str, req: tuple, tally: collections.Counter) -> None:
    kind, path, body, headers = req
    kwargs = (
        {"content": body, "headers": {**headers, "content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body, "headers": headers}
    )
    if kind == "hangup":
        try:
            await client.post(f"{base}{path}", timeout=0.05, **kwargs)
        except httpx.TimeoutException:
            tally["hangup"] += 1
            return
    if kind == "ask_stream":
        async with client.stream("POST", f"{base}{path}", **kwargs) as r:
            async for _ in r.aiter_lines():
                pass
    else:
        r = await client.post(f"{base}{path}", **kwargs)
    tally[f"{kind} {r.status_code}"] += 1
    if r.status_code >= 500:
        tally["5xx"] += 1


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def drive(base: str, reqs: list, concurrency: int) -> collections.Counter:
    tally: collections.Counter = collections.Counter()
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def task(req: tuple) -> None:
            async with sem:
                await _one(client, base, req, tally)

        await asyncio.gather(*(task(r) for r in reqs))
    return tally


def main() -> None:
    from benchmarks.common import report
    from benchmarks.serve_load import start_medask, stop
    from training.data import heldout_rows

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logs = ROOT / "runs" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ["MEDASK_API_KEYS"] = KEY
    os.environ["MEDASK_MAX_BODY_BYTES"] = "65536"
    server = start_medask(args.model, True, logs / "soak.log")
    if server.error:
        raise SystemExit(f"server did not start: {server.error}")
    proc = psutil.Process(server.proc.pid)
    reqs = _requests(heldout_rows(), args.requests, args.seed)
    try:
        asyncio.run(drive(server.base, reqs[:200], args.concurrency))  # warm-up: allocator and caches settle
        rss0 = proc.memory_info().rss
        samples = [rss0]
        t0 = time.perf_counter()
        tally: collections.Counter = collections.Counter()
        chunk = max(1, len(reqs) // 10)
        for lo in range(0, len(reqs), chunk):
            tally += asyncio.run(drive(server.base, reqs[lo : lo + chunk], args.concurrency))
            samples.append(proc.memory_info().rss)
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        metrics = httpx.get(f"{server.base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        ready = httpx.get(f"{server.base}/ready").status_code
    finally:
        stop(server)
    growth = samples[-1] / rss0 - 1
    row = {
        "requests": len(reqs),
        "concurrency": args.concurrency,
        "seconds": wall,
        "req_s": len(reqs) / wall,
        "rss_start_mb": rss0 / 1e6,
        "rss_end_mb": samples[-1] / 1e6,
        "rss_max_mb": max(samples) / 1e6,
        "rss_growth": growth,
        "5xx": tally["5xx"],
        "running_after": _gauge(metrics, "medask_num_requests_running"),
        "waiting_after": _gauge(metrics, "medask_num_requests_waiting"),
        "ready_after": ready,
    }
    report("soak: mixed requests against one server", [row], {"statuses": dict(sorted(tally.items()))})
    print("\nstatuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())))
    ok = growth < RSS_LIMIT and tally["5xx"] == 0 and row["running_after"] == 0 and row["waiting_after"] == 0
    print(f"\n{'PASS' if ok else 'FAIL'}: RSS growth {growth:+.1%} (limit {RSS_LIMIT:.0%}), 5xx {tally['5xx']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
