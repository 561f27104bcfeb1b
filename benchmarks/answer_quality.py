"""How often a checkpoint's answers are degenerate, by the service's own quality gate.

Generates greedy answers (as /ask does: role prompt, the engine's decode loop)
to the emergency/crisis questions of the triage set and to held-out MedText
questions, and prints the share the gate withholds and why. ``--save FILE``
writes the answers with their verdicts as JSONL (tests/data/shipped_answers.jsonl
holds real loops written by the shipped model, for the gate's tests).

    python benchmarks/answer_quality.py --checkpoint model_artifacts/default --save tests/data/shipped_answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.clinical.quality import assess
from app.engine.base import GenerationJob, SamplingParams
from app.engine.local import Engine
from benchmarks.common import report
from training.data import heldout_rows, role_for_case

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=str(ROOT / "model_artifacts" / "default"))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=40)
    ap.add_argument("--save")
    args = ap.parse_args()
    engine = Engine.load(Path(args.checkpoint))
    cases = [json.loads(line) for line in (ROOT / "tests" / "data" / "triage_cases.jsonl").open()]
    questions = [(c["id"], c["text"]) for c in cases if c["label"] in ("emergency", "crisis")]
    questions += [(r.id, r.prompt) for r in heldout_rows(args.heldout)]
    out = []
    for lo in range(0, len(questions), 16):
        chunk = questions[lo : lo + 16]
        jobs = [
            GenerationJob(engine.encode_question(q, role_for_case(q)), SamplingParams(args.max_new_tokens))
            for _, q in chunk
        ]
        for (qid, q), res in zip(chunk, engine.generate(jobs), strict=True):
            quality = assess(res.text, q, res.score.perplexity)
            out.append(
                {"id": qid, "question": q, "answer": res.text, "perplexity": res.score.perplexity, **quality.public()}
            )
    rows = []
    for name, subset in (
        ("triage emergencies+crises", [o for o in out if not o["id"].startswith("medtext")]),
        ("held-out MedText", [o for o in out if o["id"].startswith("medtext")]),
    ):
        n = len(subset)
        rows.append(
            {
                "questions": name,
                "n": n,
                "degenerate": round(sum(o["degenerate"] for o in subset) / max(n, 1), 3),
                "repetitive or loop": round(
                    sum(any(r in ("repetitive", "loop") for r in o["reasons"]) for o in subset) / max(n, 1), 3
                ),
                "mean repetition": round(sum(o["repetition"] for o in subset) / max(n, 1), 3),
            }
        )
    report(f"Answer quality gate on {args.checkpoint}", rows)
    if args.save:
        with open(args.save, "w", encoding="utf-8") as fh:
            for o in out:
                fh.write(json.dumps(o) + "\n")


if __name__ == "__main__":
    main()
