"""The safety layer on the labelled set: recall per class and false alarms, per part
(``tune``: the rules were developed against it; ``holdout``: never looked at while tuning),
and the latency the layer adds per request (p50/p99 over every question, repeated).

    python benchmarks/triage.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.safety import SafetyLayer
from benchmarks.common import report

CASES = Path(__file__).resolve().parents[1] / "tests" / "data" / "triage_cases.jsonl"


def main() -> None:
    t0 = time.perf_counter()
    layer = SafetyLayer.load()
    load_s = time.perf_counter() - t0
    cases = [json.loads(line) for line in CASES.open()]
    rows = []
    for part in ("tune", "holdout", "all"):
        subset = [c for c in cases if part == "all" or c["part"] == part]
        row: dict[str, object] = {"part": part, "questions": len(subset)}
        for label in ("emergency", "crisis"):
            of = [c for c in subset if c["label"] == label]
            hit = sum(any(f.level == label for f in layer.triage(c["text"]).flags) for c in of)
            row[f"{label} recall"] = f"{hit}/{len(of)} = {hit / len(of):.3f}"
        urgent = [c for c in subset if c["label"] == "urgent"]
        u_hit = sum(layer.triage(c["text"]).level == "urgent" for c in urgent)
        row["urgent found"] = f"{u_hit}/{len(urgent)}"
        routine = [c for c in subset if c["label"] == "routine"]
        alarms = sum(layer.triage(c["text"]).level in ("emergency", "crisis") for c in routine)
        row["routine false alarms"] = f"{alarms}/{len(routine)} = {alarms / len(routine):.3f}"
        out = [c for c in subset if c.get("scope") == "out"]
        refused = sum(not layer.triage(c["text"]).in_scope for c in out)
        wrongly = sum(not layer.triage(c["text"]).in_scope for c in subset if c.get("scope") != "out")
        row["out-of-scope refused"] = f"{refused}/{len(out)} (medical refused: {wrongly})"
        rows.append(row)
    times = []
    for _ in range(5):
        for c in cases:
            t = time.perf_counter()
            layer.triage(c["text"])
            times.append(time.perf_counter() - t)
    times.sort()
    latency = {
        "p50_ms": round(1000 * times[len(times) // 2], 3),
        "p99_ms": round(1000 * times[int(len(times) * 0.99)], 3),
        "calls": len(times),
        "rules_load_s": round(load_s, 2),
        "rules_version": layer.version,
    }
    report("Red-flag triage on the labelled set", rows, {"latency": latency})
    print(f"\nlatency per request: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms ({len(times)} calls)")


if __name__ == "__main__":
    main()
