"""Grounded answers on held-out MedText questions: are the key facts of the reference answer in what a
clinician reads, and is every sentence shown checkable?

For each held-out case (never seen by any training stage; its answer is not in the evidence pack), the
served prompt is built as the service builds it (role + question + the evidence block), the model
answers greedily, and the answer is delivered under each grounding mode. Key facts: the conditions,
drugs and tests the reference answer names (``app.clinical.grounding.named_things`` with the pack's condition
names). Reported per mode: the share of key facts found in the delivered text, the support rate of
the model's sentences, how often the answer came from the model, the evidence or both, citation
integrity (every ``[n]`` points to a passage given), and the time grounding adds (p50/p99).

    python benchmarks/grounding.py [--model model_artifacts/default] [--pack model_artifacts/evidence] [--rows 60]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.clinical.evidence import gather, load_pack
from app.clinical.grounding import ground
from app.clinical.sentences import named_things
from app.engine.base import GenerationJob, SamplingParams
from app.engine.local import Engine
from benchmarks.common import report


def main() -> None:
    from training.data import heldout_rows, role_for_case

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--pack", default="model_artifacts/evidence")
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--show", type=int, default=0, help="print this many delivered (strict) answers to rate by hand")
    args = p.parse_args()
    engine = Engine.load(Path(args.model))
    engine.use_static_decoder(16, lm_head="auto", decode_weights="auto", prompt_weights="auto")
    pack = load_pack(Path(args.pack))
    assert pack is not None, f"no evidence pack at {args.pack} (python -m training evidence --default)"
    lexicon = pack.lexicon
    cases = []
    for row in heldout_rows():
        facts = named_things(row.completion, lexicon)
        if facts:
            cases.append((row, facts))
        if len(cases) >= args.rows:
            break
    jobs, contexts = [], []
    for row, facts in cases:
        role = role_for_case(row.prompt)
        passages, block = gather(pack, role, row.prompt, engine.count_tokens, 3, 256)
        ids = engine.encode_question(row.prompt, role, block)
        jobs.append(GenerationJob(ids, SamplingParams(max_new_tokens=args.tokens)))
        contexts.append((row, facts, passages))
    t0 = time.perf_counter()
    results = []
    for i in range(0, len(jobs), 16):
        results += engine.generate(jobs[i : i + 16])
    gen_s = time.perf_counter() - t0
    modes = {"model text (unchecked)": "off", "mark": "mark", "strict (default)": "strict"}
    totals = {
        name: {"found": 0, "facts": 0, "bad_markers": 0, "markers": 0} for name in [*modes, "citations (upper bound)"]
    }
    sources = {"model": 0, "evidence": 0, "mixed": 0}
    supported = sentences = 0
    times: list[float] = []
    for (row, facts, passages), result in zip(contexts, results, strict=True):
        for name, mode in modes.items():
            t = time.perf_counter()
            g = ground(result.text, passages, row.prompt, mode, lexicon)  # type: ignore[arg-type]
            if mode == "strict":
                times.append(time.perf_counter() - t)
                sources[g.answer_source] += 1
                supported += sum(c.supported for c in g.checked)
                sentences += len(g.checked)
            low = g.text.lower()
            totals[name]["found"] += sum(f in low for f in facts)
            totals[name]["facts"] += len(facts)
            markers = [int(n) for n in re.findall(r"\[(\d+)\]", g.text)]
            totals[name]["markers"] += len(markers)
            totals[name]["bad_markers"] += sum(not 1 <= n <= len(passages) for n in markers)
        cited = " ".join(f"{p.title} {p.text}" for p in passages).lower()
        totals["citations (upper bound)"]["found"] += sum(f in cited for f in facts)
        totals["citations (upper bound)"]["facts"] += len(facts)
    for (row, _, passages), result in list(zip(contexts, results, strict=True))[: args.show]:
        g = ground(result.text, passages, row.prompt, "strict", lexicon)
        print(
            f"\n### {row.id}\nQUESTION: {row.prompt}\nREFERENCE: {row.completion}\nMODEL: {result.text}\n"
            f"DELIVERED ({g.answer_source}): {g.text}"
        )
    rows = []
    base = totals["model text (unchecked)"]["found"] / max(totals["model text (unchecked)"]["facts"], 1)
    for name, t in totals.items():
        share = t["found"] / max(t["facts"], 1)
        rows.append(
            {
                "answer": name,
                "key facts found": f"{t['found']}/{t['facts']} = {share:.3f}",
                "x model text": round(share / base, 2) if base else None,
                "markers pointing outside the citations": f"{t['bad_markers']}/{t['markers']}",
            }
        )
    times.sort()
    extra = {
        "cases": len(cases),
        "answer_source (strict)": sources,
        "model sentences supported": f"{supported}/{sentences}",
        "grounding_ms": {"p50": round(1000 * times[len(times) // 2], 2), "p99": round(1000 * times[-1], 2)},
        "generation_s": round(gen_s, 1),
        "lexicon_names": len(lexicon),
    }
    report("Grounded answers on held-out MedText cases", rows, extra)
    print(f"\n{extra}")


if __name__ == "__main__":
    main()
