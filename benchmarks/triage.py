"""The safety layer on the labelled sets: recall and false alarms per set, language and style, for
each signal alone (the rules: phrases + findings; the classifier) and combined (what is served),
language detection accuracy, the classifier's 5-fold cross-validation on its own training examples,
and the latency triage adds per question (p50/p99).

Sets: ``tests/data/triage/holdout.jsonl`` (written before the rules of issue 22, never used to tune),
``app/clinical/triage/tune.jsonl`` (rules and the classifier were developed on it: its numbers are optimistic)
and the older ``tests/data/triage_cases.jsonl`` (textbook phrasing; its tune part trains the classifier).

    python benchmarks/triage.py
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.clinical.safety import SafetyLayer
from benchmarks.common import report

ROOT = Path(__file__).resolve().parents[1]
SETS = {
    "holdout": ROOT / "tests" / "data" / "triage" / "holdout.jsonl",
    "tune": ROOT / "app" / "clinical" / "triage" / "tune.jsonl",
    "textbook (older set)": ROOT / "tests" / "data" / "triage_cases.jsonl",
}
ALARM = ("emergency", "crisis")


def _cases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def _frac(hits: int, n: int) -> str:
    return f"{hits}/{n} = {hits / n:.3f}" if n else "-"


def evaluate(layer: SafetyLayer, cases: list[dict]) -> dict[str, dict[str, list[int]]]:
    """Counts [hits, n] per group for recall (emergency + crisis flagged at an alarm level), routine
    false alarms and out-of-scope refusals, for each signal and combined."""
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for c in cases:
        a = layer.assess(c["text"])
        t = layer.triage(c["text"])
        levels = {"rules": a.level("rules"), "classifier": a.level("classifier"), "combined": t.level}
        lang, style = c.get("lang", "en"), c.get("style", c.get("part", "-"))
        groups = ("all", f"lang {lang}", f"style {style}", f"{lang} {style}")
        for signal, level in levels.items():
            if c["label"] in ALARM:
                key = "recall"
                hit = level in ALARM
            elif c["label"] == "routine":
                key = "false_alarm"
                hit = level in ALARM
            else:
                key = "urgent_found"
                hit = level != "routine"
            for g in groups:
                cell = counts[f"{signal}|{key}"][g]
                cell[0] += hit
                cell[1] += 1
        if c.get("scope") == "out":
            for g in ("all", f"lang {lang}"):
                cell = counts["combined|refused"][g]
                cell[0] += not t.in_scope
                cell[1] += 1
        for g in ("all", f"lang {lang}"):
            cell = counts["language|correct"][g]
            cell[0] += t.language == lang
            cell[1] += 1
    return counts


def rows_for(name: str, counts: dict[str, dict[str, list[int]]]) -> list[dict[str, object]]:
    groups = sorted(counts["combined|recall"], key=lambda g: (g != "all", not g.startswith("lang"), g))
    rows = []
    for g in groups + sorted(set(counts["combined|false_alarm"]) - set(groups)):
        row: dict[str, object] = {"set": name, "group": g}
        for signal in ("rules", "classifier", "combined"):
            row[f"{signal} recall"] = _frac(*counts[f"{signal}|recall"].get(g, [0, 0]))
        for signal in ("rules", "classifier", "combined"):
            row[f"{signal} false alarms"] = _frac(*counts[f"{signal}|false_alarm"].get(g, [0, 0]))
        row["urgent found"] = _frac(*counts["combined|urgent_found"].get(g, [0, 0]))
        row["off-topic refused"] = _frac(*counts["combined|refused"].get(g, [0, 0]))
        row["language right"] = _frac(*counts["language|correct"].get(g, [0, 0]))
        if g.startswith("style") or g.startswith("en ") or g.startswith("pt ") or g in ("all",) or g.startswith("lang"):
            rows.append(row)
    return rows


def classifier_cv(layer: SafetyLayer, folds: int = 5) -> dict[str, object]:
    """The classifier alone, k-fold cross-validated on its own examples, at the rule file's thresholds."""
    import random

    from app.clinical.triage.classifier import TriageClassifier, read_examples
    from app.clinical.triage.text import canonical, fold

    assert layer.rules.classifier is not None
    examples = [e for n in layer.rules.classifier.examples for e in read_examples(layer.source.parent / n)]
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    parts = [order[i::folds] for i in range(folds)]
    texts = [fold(canonical(e.text)) for e in examples]
    hit = pos = alarm = neg = 0
    for part in parts:
        held = set(part)
        train = [i for i in order if i not in held]
        clf = TriageClassifier([texts[i] for i in train], [examples[i].label for i in train])
        for i in part:
            p = clf.probabilities(texts[i])
            flagged = [lvl for lvl in ALARM if p.get(lvl, 0) >= getattr(layer.rules.classifier, lvl)]
            if examples[i].label in ALARM:
                pos += 1
                hit += bool(flagged)
            else:
                neg += 1
                alarm += bool(flagged)
    return {"examples": len(examples), "folds": folds, "recall": _frac(hit, pos), "false_alarms": _frac(alarm, neg)}


def main() -> None:
    t0 = time.perf_counter()
    layer = SafetyLayer.load()
    load_s = time.perf_counter() - t0
    rows: list[dict[str, object]] = []
    everything: list[dict] = []
    for name, path in SETS.items():
        cases = _cases(path)
        everything += cases
        rows += rows_for(name, evaluate(layer, cases))
    times = []
    for _ in range(3):
        for c in everything:
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
    cv = classifier_cv(layer)
    report("Red-flag triage on the labelled sets", rows, {"latency": latency, "classifier_cv": cv})
    print(
        f"\nclassifier alone, {cv['folds']}-fold CV on its {cv['examples']} examples: recall {cv['recall']}, "
        f"false alarms {cv['false_alarms']}"
    )
    print(f"latency per question: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms ({len(times)} calls)")


if __name__ == "__main__":
    main()
