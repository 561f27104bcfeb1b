"""MedAsk in upstream mode in front of llama.cpp's llama-server: an engine that generates but cannot
score prompts. Not part of CI (llama-server is built by benchmarks/build_llama_cpp.sh).

    python benchmarks/upstream_llama_cpp.py [--model model_artifacts/default]

Starts llama-server on the model's GGUF export and MedAsk with MEDASK_ENGINE=upstream in front of it,
then prints what each route answers: /info's view of the upstream, /perplexity (501 with the reason),
/ask and its stream (the answer, perplexity null with a note), and whether the answer is the one MedAsk's
own engine gives (greedy; where two tokens are within a few 1e-3 of each other the two engines'
arithmetic may pick differently).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.llama_cpp_peer import gguf_files, require_llama_server, start_llama  # noqa: E402
from benchmarks.serve_load import start_medask, stop  # noqa: E402

QUESTION = "A 45-year-old man has a productive cough and fever for three days. What is the likely diagnosis?"


def same_prefix(got: str, want: str) -> str:
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    if got == want:
        return f"identical ({len(want)} characters)"
    return f"identical for the first {n} of {len(want)} characters, then {got[n : n + 30]!r} vs {want[n : n + 30]!r}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    args = p.parse_args()
    require_llama_server()
    work = ROOT / "runs" / "bench"
    gguf, _ = gguf_files(args.model, work)
    ask = {"question": QUESTION, "role": "Pulmonologist", "max_new_tokens": 32}
    env = {"MEDASK_EVIDENCE": "false"}
    local = start_medask(args.model, True, work / "local.log", env)
    try:
        mine = httpx.post(f"{local.base}/ask", json=ask, timeout=120).json()
        want = mine["answer"]
    finally:
        stop(local)
    llama = start_llama(gguf, "llama-server f32", 4, 1024, work / "llama-upstream.log")
    front = start_medask(
        args.model, True, work / "front.log", {**env, "MEDASK_ENGINE": "upstream", "MEDASK_UPSTREAM_URL": llama.base}
    )
    try:
        info = httpx.get(f"{front.base}/info").json()["engine"]
        score = httpx.post(f"{front.base}/perplexity", json={"items": [{"text": "Pneumonia."}]})
        answer = httpx.post(f"{front.base}/ask", json=ask, timeout=120).json()
        summary = None
        with httpx.stream("POST", f"{front.base}/ask", json={**ask, "stream": True}, timeout=120) as r:
            lines = list(r.iter_lines())
        for i, line in enumerate(lines):
            if line == "event: summary":
                summary = json.loads(lines[i + 1][5:])
        rows = [
            (
                "/info engine",
                json.dumps({k: info[k] for k in ("model", "available", "scores_prompts", "score_problem")}),
            ),
            ("/perplexity", f"{score.status_code} {score.json()['error']['type']}: {score.json()['error']['message']}"),
            ("/ask perplexity", f"{answer['perplexity']} ({answer['perplexity_note']})"),
            (
                "/ask prompt tokens (front, MedAsk local)",
                f"{answer['usage']['prompt_tokens']}, {mine['usage']['prompt_tokens']}",
            ),
            ("/ask answer vs MedAsk local's", same_prefix(answer["answer"], want)),
            (
                "/ask stream perplexity",
                f"{summary and summary['perplexity']} ({summary and summary['perplexity_note']})",
            ),
        ]
    finally:
        stop(front)
        stop(llama)
    print("## MedAsk (upstream mode) in front of llama-server\n\n| route | result |\n|---|---|")
    for route, result in rows:
        print(f"| {route} | {result} |")


if __name__ == "__main__":
    main()
