"""MedAsk in upstream mode vs the engine behind it vs MedAsk's own engine, in one run.

    python benchmarks/upstream_load.py [--upstream-url http://127.0.0.1:8001] [--model model_artifacts/default]
                                       [--tokens 64] [--concurrency 1 16 64] [--requests 16 64 128]

Three targets, driven alike by serve_load.drive (streaming chat, greedy, fixed max_tokens, held-out
questions): the upstream engine directly (its own /v1/chat/completions), MedAsk with
MEDASK_ENGINE=upstream in front of it (what the front costs: prompt rendering, triage, evidence,
scoring, fairness), and MedAsk with its local engine on this machine. Without ``--upstream-url`` the
upstream is a second MedAsk in local mode started here (on a CPU this measures the front's overhead;
on a GPU ``benchmarks/gpu_vllm.sh`` passes vLLM's URL). Servers run one at a time, except the front
and its upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import Target, drive, start_medask, stop  # noqa: E402


def main() -> None:
    from benchmarks.common import report
    from training.data import heldout_rows

    p = argparse.ArgumentParser()
    p.add_argument("--upstream-url", default=None, help="a running OpenAI-compatible engine (e.g. vLLM)")
    p.add_argument("--upstream-name", default="vllm", help="how the report names that engine")
    p.add_argument("--model", default="model_artifacts/default", help="the checkpoint (MedAsk's tokenizer)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--max-batch", type=int, default=64, help="MedAsk's MEDASK_MAX_BATCH_SIZE for both modes")
    args = p.parse_args()
    questions = [r.prompt for r in heldout_rows()[:64]]
    logs = ROOT / "runs" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    common = {"MEDASK_MAX_BATCH_SIZE": str(args.max_batch), "MEDASK_EVIDENCE": "false"}

    rows, notes = [], {}

    def run(t: Target) -> None:
        if t.error:
            notes[t.name] = t.error
            return
        for c, n in zip(args.concurrency, args.requests, strict=True):
            try:
                rows.append(asyncio.run(drive(t, questions, c, n, args.tokens)))
            except Exception as exc:  # reported, not fatal
                notes[t.name] = f"{type(exc).__name__}: {exc}"[:500]
                return

    own = None
    if args.upstream_url:
        base = args.upstream_url.rstrip("/").removesuffix("/v1")
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        upstream = Target(args.upstream_name, base, model)
    else:
        own = start_medask(args.model, True, logs / "upstream.log", common)
        own.name = "upstream (MedAsk, local mode)"
        upstream = own
    try:
        run(upstream)
        front = start_medask(
            args.model,
            True,
            logs / "front.log",
            {**common, "MEDASK_ENGINE": "upstream", "MEDASK_UPSTREAM_URL": upstream.base},
        )
        front.name = "medask (upstream mode)"
        try:
            run(front)
        finally:
            stop(front)
    finally:
        if own is not None:
            stop(own)
    if args.upstream_url:  # MedAsk's own engine on the same machine, alone
        local = start_medask(args.model, True, logs / "local.log", common)
        local.name = "medask (local engine)"
        try:
            run(local)
        finally:
            stop(local)
    ratios = []
    for c in args.concurrency:
        by = {r["server"]: r for r in rows if r["concurrency"] == c}
        front_row, up_row = by.get("medask (upstream mode)"), by.get(upstream.name)
        if front_row and up_row:
            row = {"concurrency": c, "tok_s front / upstream": front_row["tok_s"] / up_row["tok_s"]}
            local_row = by.get("medask (local engine)")
            if local_row:
                row["tok_s front / local engine"] = front_row["tok_s"] / local_row["tok_s"]
            ratios.append(row)
    report(
        f"upstream mode ({args.tokens} new tokens, greedy, streaming chat)", rows, {"ratios": ratios, "notes": notes}
    )
    if ratios:
        report("ratios", ratios)
    for name, note in notes.items():
        print(f"\n{name}: {note}")


if __name__ == "__main__":
    main()
