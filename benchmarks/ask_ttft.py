"""Time to the first words of an /ask answer with its evidence, against llama-server given the same
rendered prompt.

    bash benchmarks/build_llama_cpp.sh     # once
    python benchmarks/ask_ttft.py [--model model_artifacts/default] [--concurrency 1 16] [--requests 16 48]

MedAsk: streamed ``POST /ask`` (the default evidence, k and budget from the checkpoint's contract,
``grounding: off`` so the first token event is the model's first token, not the first checked
sentence), held-out MedText questions in the General Practitioner role that MedAsk answers with the
model (out-of-scope ones are refused before any model call, and left out for every server); TTFT = arrival of the first
``token`` event after the triage event (routine questions carry no advice). llama-server: the prompt
MedAsk renders for the same question (role, evidence block, question; rebuilt here with MedAsk's own
code and checked against /ask's ``usage.prompt_tokens``) as token ids through streamed
``/v1/completions``; TTFT = first text chunk. Both 64 tokens, greedy; every server is started first and
at 1 user they take turns (``--rounds``: each server's share of the requests in turn), at more users each
runs its requests in one go, one server at a time; llama-server
once with its prompt cache off (``cache_prompt: false``: every prompt computed) and once on (its
default), MedAsk with its prefix cache (``MEDASK_PREFIX_CACHE_MB``, default) and without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from benchmarks.llama_cpp_peer import gguf_files, require_llama_server, start_llama  # noqa: E402
from benchmarks.serve_load import Target, start_medask, stop  # noqa: E402

ROLE = "General Practitioner"


def rendered_prompts(model: str, questions: list[str]) -> list[list[int]]:
    """The token ids MedAsk's /ask puts before the model for each question (no history)."""
    from app.clinical.clinic import EVIDENCE_FRAME_TOKENS
    from app.clinical.evidence import DEFAULT_K, DEFAULT_MAX_TOKENS, gather, load_pack
    from app.clinical.prompting import render_prompt
    from app.engine.base import open_checkpoint
    from app.manifest import serving_contract

    _, front, manifest, config = open_checkpoint(Path(model))
    pack = load_pack(ROOT / "model_artifacts" / "evidence")
    contract = serving_contract(manifest)
    k = contract.evidence_k or DEFAULT_K
    budget = contract.evidence_max_tokens or DEFAULT_MAX_TOKENS

    def encode(text: str) -> list[int]:
        return front(text, add_special_tokens=False)["input_ids"]

    out = []
    for q in questions:
        bare = encode(render_prompt(front, q, ROLE))
        room = int(config["max_position_embeddings"]) - len(bare) - 64 - EVIDENCE_FRAME_TOKENS
        _, block = gather(pack, ROLE, q, lambda t: len(encode(t)), k, min(budget, room))
        out.append(encode(render_prompt(front, q, ROLE, block)) if block else bare)
    return out


async def ask(client: httpx.AsyncClient, t: Target, question: str, prompt: list[int], tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, prompt_tokens = None, None
    if t.name.startswith("medask"):
        body = {"question": question, "role": ROLE, "max_new_tokens": tokens, "stream": True, "grounding": "off"}
        async with client.stream("POST", f"{t.base}/ask", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{t.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "token" and ttft is None:
                    ttft = time.perf_counter() - t0
                elif line.startswith("data: ") and event == "summary":
                    prompt_tokens = json.loads(line[6:])["usage"]["prompt_tokens"]
    else:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        body.update(repeat_penalty=1.0, cache_prompt=t.model == "cache")
        async with client.stream("POST", f"{t.base}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and ttft is None and json.loads(line[6:])["choices"][0].get("text"):
                    ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else latency, "latency": latency, "prompt_tokens": prompt_tokens}


def answered(model: str, questions: list[str], work: Path) -> list[str]:
    """The questions MedAsk answers with the model: an out-of-scope question is refused by the rule layer
    before any model call (its "first token" would be instant) and is left out for every server."""
    t = start_medask(model, True, work / "ask-filter.log", {"MEDASK_COMPILE": "false", "MEDASK_WARMUP": "false"})
    try:
        body = {"role": ROLE, "max_new_tokens": 1, "grounding": "off"}
        usage = [
            httpx.post(f"{t.base}/ask", json={**body, "question": q}, timeout=120).json()["usage"] for q in questions
        ]
    finally:
        stop(t)
    return [q for q, u in zip(questions, usage, strict=True) if u["prompt_tokens"] > 0]


async def drive(
    t: Target, questions: list[str], prompts: list[list[int]], concurrency: int, n: int, tokens: int, first: int = 0
):
    """Requests ``first .. first + n`` of the question sequence (cycled), ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one(i: int) -> dict:
            async with sem:
                j = i % len(questions)
                return await ask(client, t, questions[j], prompts[j], tokens)

        await one(0)  # warm-up
        return await asyncio.gather(*(one(i) for i in range(first, first + n)))


def main() -> None:
    from training.data import heldout_rows

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, nargs="+", default=[16, 48])
    p.add_argument("--questions", type=int, default=24)
    p.add_argument(
        "--rounds", type=int, default=4, help="each server takes its share of a concurrency's requests in turn"
    )
    args = p.parse_args()
    require_llama_server()
    work = ROOT / "runs" / "bench"
    _, q4 = gguf_files(args.model, work)
    questions = answered(args.model, [r.prompt for r in heldout_rows()[: args.questions * 2]], work)[: args.questions]
    prompts = rendered_prompts(args.model, questions)
    slots = max(args.concurrency)
    env = {"MEDASK_MAX_BATCH_SIZE": str(slots), "MEDASK_QUEUE_SIZE": "256"}
    servers = {
        "medask (prefix cache)": lambda: start_medask(args.model, True, work / "ask-medask.log", env),
        "medask (no prefix cache)": lambda: start_medask(
            args.model, True, work / "ask-medask-nocache.log", {**env, "MEDASK_PREFIX_CACHE_MB": "0"}
        ),
        "llama-server Q4_0 (prompt cache on)": lambda: start_llama(q4, "cache", slots, 1024, work / "ask-q4.log"),
        "llama-server Q4_0 (prompt cache off)": lambda: start_llama(q4, "nocache", slots, 1024, work / "ask-q4b.log"),
    }
    rows, checks = [], {}
    # every server up at once and measured in turns (a round: each server's next requests, the order rotated):
    # this machine drifts by 20-50% within minutes, and one server after another compared the drift
    targets = {}
    try:
        for name, factory in servers.items():
            t = factory()
            t.model = "cache" if "cache on" in name else t.model if name.startswith("medask") else "nocache"
            t.name = name
            targets[name] = t
        for c, n in zip(args.concurrency, args.requests, strict=True):
            # at 1 user the servers take turns; at more, each runs its requests in one go (a turn of a few
            # requests would be a burst of simultaneous arrivals, another load than n requests kept at c)
            rounds = args.rounds if c == 1 else 1
            share = -(-n // rounds)
            got: dict[str, list[dict]] = {name: [] for name in targets}
            for r in range(rounds):
                order = list(targets)[r % len(targets) :] + list(targets)[: r % len(targets)]
                for name in order:
                    first = r * share
                    if first < n:
                        rs = asyncio.run(
                            drive(targets[name], questions, prompts, c, min(share, n - first), args.tokens, first)
                        )
                        got[name] += rs
            for name, rs in got.items():
                ttfts = sorted(x["ttft"] for x in rs)
                rows.append(
                    {
                        "server": name,
                        "concurrency": c,
                        "requests": n,
                        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
                        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
                        "latency_p50_s": round(statistics.median(x["latency"] for x in rs), 3),
                    }
                )
                print(rows[-1], file=sys.stderr, flush=True)
                served = [x["prompt_tokens"] for x in rs if x["prompt_tokens"] is not None]
                if served:
                    checks[name] = sorted(set(served)) == sorted({len(prompts[i % len(prompts)]) for i in range(n)})
    finally:
        for t in targets.values():
            stop(t)
    report(
        f"/ask time to first token with evidence vs llama-server Q4_0 on the same rendered prompt ({args.tokens} tokens)",
        rows,
        {
            "prompt_tokens": {"min": min(map(len, prompts)), "median": statistics.median(map(len, prompts))},
            "medask_prompt_tokens_equal_rendered": checks,
        },
    )


if __name__ == "__main__":
    main()
