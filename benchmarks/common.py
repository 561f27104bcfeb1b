"""What every benchmark prints: the machine, the versions, the command."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from app.engine.decode import cpu_flags

    return {
        "cpu": cpu,
        "cpu_flags": list(cpu_flags()),  # a default measured on one CPU kind must be measured on the other
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "gptqmodel", "optimum", "fastapi")},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def report(title: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """A Markdown table and the same numbers as JSON."""
    info = machine()
    print(f"## {title}\n")
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, device {info['device']}"
    )
    print(f"versions: {info['versions']}")
    print(f"command: `{info['command']}`\n")
    if rows:
        cols = list(rows[0])
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    print("\n```json")
    print(json.dumps({"title": title, "machine": info, "rows": rows, **(extra or {})}, indent=1))
    print("```")


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def native_bench_args(rounds: int = 5) -> Any:
    """``--model`` and ``--rounds`` for a benchmark of MedAsk's C++ kernels; exits saying why where they are
    unavailable (not built, or a CPU without AVX2)."""
    import argparse

    from app.engine import native

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--rounds", type=int, default=rounds)
    args = p.parse_args()
    if why := native.load():
        sys.exit(f"MedAsk's kernels are unavailable: {why}")
    return args


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, seconds: float = 180) -> bool:
    """Poll ``url`` until it answers 200 (a server finished loading); False after ``seconds``."""
    import time

    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def heldout_prompts(engine: Any, count: int | None = None) -> list[list[int]]:
    """Served prompts (role + question) of held-out MedText rows: what every decode benchmark feeds."""
    from training.data import heldout_rows, role_for_case

    rows = heldout_rows()[:count] if count else heldout_rows()
    return [engine.encode_question(r.prompt, role_for_case(r.prompt)) for r in rows]


def decode_rates(engine: Any, prompts: list[list[int]], tokens: int, batch: int = 1, repeats: int = 1) -> list[float]:
    """Generated tokens per second of greedy decoding, one number per timed batch, after a warm-up.

    Batch ``b`` of repeat ``r`` decodes prompts ``r*b .. r*b+b-1`` (wrapping) together, so every
    benchmark times the same work the same way (prefill included, as a client sees it)."""
    import time

    from app.engine.base import GenerationJob, SamplingParams

    engine.generate([GenerationJob(prompts[0], SamplingParams(8))])  # warm-up: first-call allocations
    rates = []
    for rep in range(repeats):
        jobs = [
            GenerationJob(prompts[(rep * batch + i) % len(prompts)], SamplingParams(max_new_tokens=tokens))
            for i in range(batch)
        ]
        t0 = time.perf_counter()
        results = engine.generate(jobs)
        rates.append(sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0))
    return rates


def step_rate(decoder: Any, rows: int, steps: int = 64) -> float:
    """Tokens per second of the static decode step alone at ``rows`` rows (median of 3 runs of ``steps``)."""
    import statistics
    import time

    tokens, positions = [5] * rows, [100] * rows
    decoder.decode(tokens, positions)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(steps):
            decoder.decode(tokens, [p + i for p in positions])
        times.append(time.perf_counter() - t0)
    return rows * steps / statistics.median(times)
