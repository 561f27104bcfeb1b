"""MedAsk vs llama.cpp's llama-server on the same model, same prompts, same token counts.

    bash benchmarks/build_llama_cpp.sh            # once: llama-server, llama-quantize (about 10 min)
    python benchmarks/llama_cpp_peer.py [--model model_artifacts/default] [--tokens 64]
        [--concurrency 1 4 16] [--requests 8 16 32] [--rounds 3] [--medask eager compiled compiled-per-token]

The checkpoint is exported to GGUF (`python -m training export`, dequantized f32) and quantized to
Q4_0 with llama-quantize. Every server gets the same prompts as token ids (MedAsk's role prompt
for held-out MedText questions, rendered by MedAsk's tokenizer) through /v1/completions, streamed,
greedy, `ignore_eos` so every request generates exactly --tokens tokens, `cache_prompt: false` and
`repeat_penalty: 1` for llama-server. Servers run one at a time (they would share two cores),
interleaved, --rounds times; the table gives medians with min-max. A greedy request at c=1 checks
that MedAsk and llama-server f32 produce the same tokens. MedAsk streams as shipped: at most one event
per MEDASK_STREAM_INTERVAL_MS (20 ms; the first token at once); ``compiled-per-token`` sends an event
per token, as llama-server does (tokens/s are counted from ``usage`` either way).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port  # noqa: E402
from benchmarks.serve_load import Target, _wait, drive, start_medask, stop  # noqa: E402

# where llama.cpp was built (benchmarks/build_llama_cpp.sh; LLAMA_CPP_BIN: another build, e.g. without AMX)
LLAMA = Path(os.environ.get("LLAMA_CPP_BIN") or ROOT / "runs" / "llama.cpp" / "build" / "bin")


def require_llama_server() -> None:
    """Exit with what to run when llama.cpp's server has not been built (every peer benchmark needs it)."""
    if not (LLAMA / "llama-server").is_file():
        sys.exit(f"no llama-server in {LLAMA}: run `bash benchmarks/build_llama_cpp.sh` first")


def start_llama(gguf: Path, name: str, slots: int, context: int, log: Path) -> Target:
    port = free_port()
    cmd = [
        str(LLAMA / "llama-server"),
        "-m", str(gguf),
        "--port", str(port),
        "--parallel", str(slots),
        "--ctx-size", str(slots * context),
        "--threads", str(os.cpu_count() or 2),
        # one HTTP thread per concurrent stream (its default is one per core)
        "--threads-http", str(slots + 4),
        "--no-webui",
    ]  # fmt: skip
    t = Target(name, f"http://127.0.0.1:{port}", "medask")
    t.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    _wait(t, "/health")
    return t


async def one(client: httpx.AsyncClient, t: Target, prompt: list[int], tokens: int) -> dict:
    body = {
        "model": t.model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    peer_settings(t, body)
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", f"{t.base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{t.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
    generated = (usage or {}).get("completion_tokens") or tokens
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": generated}


def greedy_text(t: Target, prompt: list[int], tokens: int) -> str:
    body = peer_settings(t, {"model": t.model, "prompt": prompt, "max_tokens": tokens, "temperature": 0})
    return httpx.post(f"{t.base}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]


PROMPT_CACHE = {"on": False}  # set from --prompt-cache

# MedAsk's configurations: the shipped defaults streaming at most an event per MEDASK_STREAM_INTERVAL_MS
# (20 ms), "per-token": an event per token, as llama-server streams, and "kv-float32": the float32 KV cache
# through torch's attention (the shipped default before the float16 cache)
MODES = {
    "eager": {"MEDASK_COMPILE": "false"},
    "compiled": {"MEDASK_COMPILE": "true"},
    "compiled-per-token": {"MEDASK_COMPILE": "true", "MEDASK_STREAM_INTERVAL_MS": "0"},
    "compiled-kv-float32": {"MEDASK_COMPILE": "true", "MEDASK_KV_CACHE_DTYPE": "float32"},
}


def peer_settings(t: Target, body: dict) -> dict:
    """llama-server's defaults that would make it do other work than MedAsk: no repeat penalty; its prompt
    cache on only with --prompt-cache on (MedAsk's prefix cache then on too, off otherwise)."""
    if t.name.startswith("llama"):
        body.update(cache_prompt=PROMPT_CACHE["on"], repeat_penalty=1.0)
    return body


def gguf_files(model: str, work: Path) -> tuple[Path, Path]:
    """The checkpoint exported to GGUF (f32) and quantized to Q4_0, rebuilt when the checkpoint is newer."""
    work.mkdir(parents=True, exist_ok=True)
    f32, q4 = work / "medask-f32.gguf", work / "medask-q4_0.gguf"
    if not f32.exists() or f32.stat().st_mtime < (Path(model) / "manifest.json").stat().st_mtime:
        cmd = [sys.executable, "-m", "training", "export", model, "--format", "gguf", "--out", str(f32)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        q4.unlink(missing_ok=True)
    if not q4.exists():
        subprocess.run([str(LLAMA / "llama-quantize"), str(f32), str(q4), "Q4_0"], check=True, capture_output=True)
    return f32, q4


def peer_prompts(model: str, tokens: int) -> tuple[int, list[list[int]]]:
    """The model's context and the peer runs' prompts: held-out MedText questions in the General Practitioner
    role as MedAsk renders them, token ids, those leaving room for ``tokens``."""
    from app.clinical.prompting import render_prompt
    from app.engine.base import open_checkpoint
    from training.data import heldout_rows

    _, front, _, config = open_checkpoint(Path(model))
    context = int(config["max_position_embeddings"])
    prompts = [
        front(render_prompt(front, r.prompt, "General Practitioner"), add_special_tokens=False)["input_ids"]
        for r in heldout_rows()[:32]
    ]
    return context, [ids for ids in prompts if len(ids) + tokens <= context]


def main() -> None:
    from benchmarks.common import report

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--medask",
        nargs="*",
        default=["eager", "compiled"],
        choices=list(MODES),
        help="MedAsk configurations to run (per-token: an SSE event per token, as llama-server sends)",
    )
    p.add_argument(
        "--prompt-cache",
        choices=["off", "on"],
        default="off",
        help="on: llama-server's prompt cache and MedAsk's prefix cache (chat traffic with a fixed role)",
    )
    p.add_argument("--peers", nargs="*", default=["f32", "Q4_0"], help="llama-server formats to run")
    args = p.parse_args()
    PROMPT_CACHE["on"] = args.prompt_cache == "on"
    require_llama_server()
    work = ROOT / "runs" / "bench"
    f32, q4 = gguf_files(args.model, work)

    context, prompts = peer_prompts(args.model, args.tokens)
    slots = max(args.concurrency)
    medask_env = {"MEDASK_MAX_BATCH_SIZE": str(slots), "MEDASK_QUEUE_SIZE": "256"}
    if not PROMPT_CACHE["on"]:
        medask_env["MEDASK_PREFIX_CACHE_MB"] = "0"
    factories = {
        f"medask ({mode})": (
            lambda mode=mode: start_medask(
                args.model,
                True,
                work / f"medask-{mode}.log",
                {**medask_env, **MODES[mode]},
            )
        )
        for mode in args.medask
    }
    if "f32" in args.peers:
        factories["llama-server f32"] = lambda: start_llama(
            f32, "llama-server f32", slots, context, work / "llama-f32.log"
        )
    if "Q4_0" in args.peers:
        factories["llama-server Q4_0"] = lambda: start_llama(
            q4, "llama-server Q4_0", slots, context, work / "llama-q4.log"
        )

    runs: dict[tuple[str, int], list[dict]] = {}
    texts: dict[str, str] = {}
    notes: dict[str, str] = {}
    for rnd in range(args.rounds):
        for name, factory in factories.items():
            t = factory()
            t.name = name
            try:
                if t.error:
                    notes[name] = t.error
                    continue
                if rnd == 0:
                    texts[name] = greedy_text(t, prompts[0], 32)
                for c, n in zip(args.concurrency, args.requests, strict=True):
                    # a new connection per request for every server: llama-server (cpp-httplib) closes a
                    # kept-alive connection after a few requests, and a client reusing it reads "disconnected"
                    result = asyncio.run(drive(t, prompts, c, n, args.tokens, request=one, keep_alive=False))
                    runs.setdefault((name, c), []).append(result)
            except Exception as exc:  # a server failing mid-run is reported, not fatal
                notes[name] = f"{type(exc).__name__}: {exc}"[:400]
            finally:
                stop(t)
            print(f"round {rnd + 1}: {name} done", file=sys.stderr)

    rows = []
    for (name, c), rs in runs.items():
        tok = sorted(r["tok_s"] for r in rs)
        rows.append(
            {
                "server": name,
                "concurrency": c,
                "tok_s_median": statistics.median(tok),
                "tok_s_min": tok[0],
                "tok_s_max": tok[-1],
                "p50_s": statistics.median(r["p50_s"] for r in rs),
                "ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in rs),
                "ttft_p99_s": statistics.median(r["ttft_p99_s"] for r in rs),
                "rounds": len(rs),
            }
        )
    ratios = []
    for c in args.concurrency:
        by = {r["server"]: r["tok_s_median"] for r in rows if r["concurrency"] == c}
        for name in (n for n in by if n.startswith("medask")):
            ratios.append(
                {
                    "medask": name,
                    "concurrency": c,
                    "vs llama-server f32": by[name] / by["llama-server f32"] if "llama-server f32" in by else "n/a",
                    "vs llama-server Q4_0": by[name] / by["llama-server Q4_0"] if "llama-server Q4_0" in by else "n/a",
                }
            )
    # the f32 export is the reference text; without it (--peers Q4_0) there is nothing to compare against
    reference = texts.get("llama-server f32")
    same = {name: text == reference for name, text in texts.items()} if reference is not None else "n/a (no f32 peer)"
    report(
        f"MedAsk vs llama-server ({args.tokens} tokens, greedy, streamed /v1/completions, token-id prompts, "
        f"{args.rounds} interleaved rounds, prompt caches {args.prompt_cache})",
        rows,
        {"ratios": ratios, "same_greedy_text_as_llama_f32": same, "notes": notes},
    )
    if ratios:
        report("ratios: MedAsk tokens/s / llama-server tokens/s (>1 favours MedAsk)", ratios)
    print(f"\nsame greedy text as llama-server f32 (32 tokens): {same}")
    for name, note in notes.items():
        print(f"{name}: {note}")


if __name__ == "__main__":
    main()
