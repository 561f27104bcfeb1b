"""Graceful shutdown as an outside probe measured it: SIGTERM with 8 plain and 2 streaming
requests in flight. Prints what each client got, how soon /ready said 503, how long the process
took to exit and its exit code.

    python benchmarks/shutdown.py --checkpoint model_artifacts/default [--drain 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report, wait_ok  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=str(ROOT / "model_artifacts" / "default"))
    ap.add_argument("--drain", type=float, default=8.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MEDASK_MODEL_DIR": args.checkpoint,
        "MEDASK_PORT": str(port),
        "MEDASK_DRAIN_S": str(args.drain),
        "MEDASK_EVIDENCE": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    if not wait_ok(f"{base}/ready"):
        raise SystemExit("the server did not become ready")
    outcomes: list[str] = []
    body = {
        "question": "A 45-year-old smoker has had a cough for six weeks. Next step?",
        "max_new_tokens": args.max_new_tokens,
    }

    def plain() -> None:
        try:
            r = httpx.post(f"{base}/ask", json=body, timeout=120)
            outcomes.append(f"plain {r.status_code} {r.json().get('error', {}).get('type', 'answer')}")
        except httpx.HTTPError as exc:
            outcomes.append(f"plain dropped ({type(exc).__name__})")

    def stream() -> None:
        last = "none"
        try:
            with httpx.stream("POST", f"{base}/ask", json={**body, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        last = line[7:]
            outcomes.append(f"stream ended with '{last}' event")
        except httpx.HTTPError as exc:
            outcomes.append(f"stream dropped ({type(exc).__name__})")

    threads = [threading.Thread(target=plain) for _ in range(8)] + [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    ready_503 = None
    while time.monotonic() - t0 < 5:
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 503:
                ready_503 = time.monotonic() - t0
                break
        except httpx.HTTPError:
            break
    for t in threads:
        t.join(180)
    code = proc.wait(120)
    exit_s = time.monotonic() - t0
    rows = [{"outcome": k, "requests": v} for k, v in sorted(Counter(outcomes).items())]
    extra = {"ready_503_after_s": ready_503, "exit_after_s": round(exit_s, 2), "exit_code": code, "drain_s": args.drain}
    report("SIGTERM with 8 plain and 2 streaming requests in flight", rows, extra)
    print(json.dumps(extra))


if __name__ == "__main__":
    main()
