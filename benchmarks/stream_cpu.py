"""Where a streamed token's CPU goes: CPU time per token of each server thread and of the client, for
MedAsk configurations and llama-server Q4_0, interleaved on the same machine.

    bash benchmarks/build_llama_cpp.sh     # once
    python benchmarks/stream_cpu.py [--concurrency 1] [--rounds 2] \\
        [--medask "" "MEDASK_STREAM_INTERVAL_MS=0"]

Each --medask entry is one MedAsk server: comma-separated KEY=VALUE settings over the peer benchmark's
(``""``: the shipped defaults). Every server gets the peer benchmark's requests (token-id prompts,
streamed /v1/completions, greedy, 64 tokens, ``ignore_eos``, a new connection each); the server's
threads are read from ``/proc/<pid>/task/*/stat`` (user + system time) before and after, the client's
from ``getrusage``. On a machine of two cores every thread's CPU is taken from the same two cores, so a
millisecond saved anywhere is time the step gets back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from benchmarks.llama_cpp_peer import gguf_files, one, peer_prompts, require_llama_server, start_llama  # noqa: E402
from benchmarks.serve_load import drive, start_medask, stop  # noqa: E402


def thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """Each thread's name and CPU seconds so far."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--medask", nargs="*", default=["", "MEDASK_STREAM_INTERVAL_MS=0"])
    args = p.parse_args()
    require_llama_server()
    work = ROOT / "runs" / "bench"
    _, q4 = gguf_files(args.model, work)
    context, prompts = peer_prompts(args.model, args.tokens)
    base_env = {"MEDASK_MAX_BATCH_SIZE": "16", "MEDASK_PREFIX_CACHE_MB": "0"}
    rows = []
    for rnd in range(args.rounds):
        for spec in [*args.medask, "llama-server Q4_0"]:
            if spec == "llama-server Q4_0":
                t = start_llama(q4, spec, 16, context, work / "stream-cpu-llama.log")
                name = spec
            else:
                env = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
                t = start_medask(args.model, True, work / "stream-cpu-medask.log", {**base_env, **env})
                name = "medask" + (f" {spec}" if spec else " (shipped defaults)")
            try:
                before, c0 = thread_cpu(t.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
                r = asyncio.run(
                    drive(t, prompts, args.concurrency, args.requests, args.tokens, request=one, keep_alive=False)
                )
                after, c1 = thread_cpu(t.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
            finally:
                stop(t)
            # drive's warm-up request asks for 4 tokens
            tokens = args.requests * args.tokens + 4
            threads = sorted(
                ((n, (s - before.get(tid, (n, 0.0))[1]) / tokens * 1e3) for tid, (n, s) in after.items()),
                key=lambda x: -x[1],
            )
            client = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / tokens * 1e3
            rows.append(
                {
                    "server": name,
                    "round": rnd + 1,
                    "tok_s": round(r["tok_s"]),
                    "ms_per_token_by_thread": [f"{n} {ms:.2f}" for n, ms in threads[:4]],
                    "client_ms_per_token": round(client, 2),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    report(f"CPU per streamed token by thread, {args.concurrency} user(s), {args.tokens} tokens", rows)


if __name__ == "__main__":
    main()
