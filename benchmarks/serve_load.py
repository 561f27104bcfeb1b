"""Serving under load: MedAsk (dynamic batching) vs the same app with batching off
(the naive one-request-at-a-time baseline) vs `transformers serve` (a real peer),
side by side on the same machine, in the same run.

    python benchmarks/serve_load.py [--model model_artifacts/default] [--tokens 64]
                                    [--concurrency 1 4 16] [--requests 16 32 64]

Every server is driven through its OpenAI-compatible /v1/chat/completions with
streaming (time to first token), greedy decoding, a fixed max_tokens and the
same held-out MedText questions. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port  # noqa: E402


@dataclass
class Target:
    name: str
    base: str
    model: str
    proc: subprocess.Popen | None = None
    error: str | None = None


def start_medask(model: str, batching: bool, log: Path, extra_env: dict[str, str] | None = None) -> Target:
    port = free_port()
    env = {
        **os.environ,
        "MEDASK_MODEL_DIR": model,
        "MEDASK_PORT": str(port),
        "MEDASK_BATCHING": str(batching).lower(),
        "MEDASK_QUEUE_SIZE": "256",
        "MEDASK_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    name = "medask" if batching else "baseline (batching off)"
    t = Target(name, f"http://127.0.0.1:{port}", "", proc)
    _wait(t, "/ready")
    if t.error is None:
        keys = env.get("MEDASK_API_KEYS", "")
        auth = {"Authorization": f"Bearer {keys.split(',')[0]}"} if keys else {}
        t.model = httpx.get(f"{t.base}/v1/models", headers=auth).json()["data"][0]["id"]
    return t


def start_peer(model: str, log: Path) -> Target:
    port = free_port()
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    t = Target("transformers serve", f"http://127.0.0.1:{port}", str(Path(model).resolve()))
    try:
        t.proc = subprocess.Popen(
            [exe, "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    except OSError as exc:
        t.error = f"cannot start: {exc}"
        return t
    _wait(t, "/v1/models")
    return t


def _wait(t: Target, path: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if t.proc is not None and t.proc.poll() is not None:
            t.error = f"exited with code {t.proc.returncode}"
            return
        try:
            if httpx.get(f"{t.base}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    t.error = f"not ready after {seconds:.0f}s"


def stop(t: Target) -> None:
    if t.proc is not None and t.proc.poll() is None:
        t.proc.terminate()
        try:
            t.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            t.proc.kill()


async def one_request(client: httpx.AsyncClient, t: Target, question: str, tokens: int) -> dict:
    body = {
        "model": t.model,
        "stream": True,
        "max_tokens": tokens,
        "temperature": 0,
        "seed": 0,
        "messages": [{"role": "user", "content": question}],
        "stream_options": {"include_usage": True},
    }
    if t.name.startswith(("medask", "baseline")):
        body.pop("stream_options")  # MedAsk always reports usage in its last chunk
    t0 = time.perf_counter()
    ttft, pieces, usage = None, 0, None
    async with client.stream("POST", f"{t.base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{t.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    generated = usage["completion_tokens"] if usage else pieces
    return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": generated}


async def drive(
    t: Target,
    questions: list[Any],
    concurrency: int,
    n: int,
    tokens: int,
    request: Callable[..., Awaitable[dict]] | None = None,
    keep_alive: bool = True,
) -> dict:
    """``n`` requests, ``concurrency`` at a time; ``request(client, t, question, tokens)`` makes one
    (default: a streamed chat completion) and returns its latency, TTFT and tokens."""
    request = request or one_request
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=None if keep_alive else 0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def task(i: int) -> dict:
            async with sem:
                return await request(client, t, questions[i % len(questions)], tokens)

        await request(client, t, questions[0], 4)  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(n)))
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {
        "server": t.name,
        "concurrency": concurrency,
        "requests": n,
        "req_s": n / wall,
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "p50_s": q[49],
        "p95_s": q[94],
        "p99_s": q[98],
        "ttft_p50_s": statistics.median(r["ttft"] for r in results),
        "ttft_p99_s": _p99(sorted(r["ttft"] for r in results)),
    }


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


def main() -> None:
    from benchmarks.common import report
    from training.data import heldout_rows

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, nargs="+", default=[12, 24, 48])
    p.add_argument("--skip-peer", action="store_true")
    args = p.parse_args()
    questions = [r.prompt for r in heldout_rows()[:48]]
    logs = ROOT / "runs" / "bench"
    logs.mkdir(parents=True, exist_ok=True)

    rows, notes = [], {}
    factories = [
        lambda: start_medask(args.model, True, logs / "medask.log"),
        lambda: start_medask(args.model, False, logs / "baseline.log"),
    ]
    if not args.skip_peer:
        factories.append(lambda: start_peer(args.model, logs / "peer.log"))
    for factory in factories:
        t = factory()  # one server at a time: they would fight over the same cores
        try:
            if t.error:
                notes[t.name] = t.error
                continue
            for c, n in zip(args.concurrency, args.requests, strict=True):
                try:
                    rows.append(asyncio.run(drive(t, questions, c, n, args.tokens)))
                except Exception as exc:  # a peer that fails mid-run is reported, not fatal
                    notes[t.name] = f"{type(exc).__name__}: {exc}"[:500]
                    break
        finally:
            stop(t)
    ratios = []
    for c in args.concurrency:
        by = {r["server"]: r for r in rows if r["concurrency"] == c}
        m = by.get("medask")
        if not m:
            continue
        row = {"concurrency": c}
        for other, label in (("baseline (batching off)", "baseline"), ("transformers serve", "peer")):
            o = by.get(other)
            row[f"tok_s vs {label}"] = m["tok_s"] / o["tok_s"] if o else "n/a"
            row[f"p50 vs {label}"] = m["p50_s"] / o["p50_s"] if o else "n/a"
        ratios.append(row)
    report(
        f"serving under load ({args.tokens} new tokens, greedy, streaming chat)",
        rows,
        {"ratios": ratios, "notes": notes},
    )
    if ratios:
        report("ratios: MedAsk / other (tok_s > 1 and p50 < 1 favour MedAsk)", ratios)
    for name, note in notes.items():
        print(f"\n{name}: {note}")


if __name__ == "__main__":
    main()
