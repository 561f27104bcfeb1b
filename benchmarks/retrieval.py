"""Retrieval good enough to ground on: BM25 alone vs MedAsk's retrieval (named conditions searched harder,
passages about them reranked up; ``app.clinical.evidence.EvidencePack.retrieve``), on four sets:

- **LiveQA 2017 medical test** (104 consumer questions from NLM, outside the team; ``benchmarks/data/``):
  recall@5 and MRR@10, a passage counting as relevant when its condition (MedQuAD focus) is one of the
  question's annotated foci (whole words, either way round); questions none of whose foci the pack covers
  are counted apart (the pack has no drug labels, so most drug questions cannot be answered from it).
- **LiveQA 2017 medical training questions** (446): the set the two weights were chosen on.
- **Held-out MedText** (141 cases no training stage saw): recall@5 as in the training report (a condition
  the gold answer names is the focus of a top-5 passage), which must not fall.
- **MedText train cases** (300, seeded sample; their own case excluded): the second tuning set.

Latency per query (p50, p99) on this machine. The query is role + question, as the service searches.

    python benchmarks/retrieval.py [--pack model_artifacts/evidence]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.clinical import evidence
from app.clinical.evidence import EvidencePack, Passage, query_for
from benchmarks.common import report

DATA = Path(__file__).resolve().parent / "data"
ROLE = "General Practitioner"


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _same(a: str, b: str) -> bool:
    """Two condition names (plain words) name the same thing: equal, or one inside the other as whole words."""
    return a == b or bool(re.search(rf"\b{re.escape(a)}\b", b) or re.search(rf"\b{re.escape(b)}\b", a))


def _about(p: Passage, foci: list[str]) -> bool:
    return any(_same(f, m) for f in foci for m in (_words(x) for x in p.focus) if len(m) >= 4)


def liveqa(pack: EvidencePack, name: str) -> tuple[list[tuple[str, list[str]]], int]:
    """(question, foci) of the questions whose foci the pack covers, and how many questions in all."""
    rows = [json.loads(line) for line in (DATA / name).open(encoding="utf-8")]
    covered = {_words(f) for p in pack.passages for f in p.focus}
    covered = {c for c in covered if len(c) >= 4}
    out = []
    for r in rows:
        foci = [w for f in r["foci"] if len(w := _words(f["text"])) >= 3]
        if any(_same(f, c) for f in foci for c in covered):
            out.append((f"{r['subject']}. {r['message']}".strip(". "), foci))
    return out, len(rows)


def rank_metrics(pack: EvidencePack, questions: list[tuple[str, list[str]]], k: int = 5) -> dict[str, Any]:
    hits, rr, lat = 0, 0.0, []
    for question, foci in questions:
        t0 = time.perf_counter()
        top = pack.retrieve(query_for(ROLE, question), 10)
        lat.append(time.perf_counter() - t0)
        ranks = [i for i, p in enumerate(top) if _about(p, foci)]
        hits += bool(ranks and ranks[0] < k)
        rr += 1 / (ranks[0] + 1) if ranks else 0.0
    return {"recall@5": hits / len(questions), "mrr@10": rr / len(questions), "rows": len(questions), **_latency(lat)}


def medtext_recall(pack: EvidencePack, rows: list[Any], exclude_own: bool, k: int = 5) -> dict[str, Any]:
    from training.data import role_for_case
    from training.evidence import conditions_in

    focuses = sorted({f.lower() for p in pack.passages for f in p.focus if p.source == "MedQuAD" and len(f) >= 5})
    hits = counted = 0
    lat = []
    for row in rows:
        gold = set(conditions_in(row.completion, focuses))
        t0 = time.perf_counter()
        top = pack.retrieve(
            query_for(role_for_case(row.prompt), row.prompt), k, exclude_docs={row.id} if exclude_own else ()
        )
        lat.append(time.perf_counter() - t0)
        if gold:
            counted += 1
            hits += any(gold & {f.lower() for f in p.focus} for p in top)
    return {"recall@5": hits / counted, "mrr@10": None, "rows": counted, **_latency(lat)}


def _latency(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {"p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def pipelines() -> dict[str, Callable[[], None]]:
    """Each pipeline as the module's weights set for it."""

    def bm25() -> None:
        evidence.NAMED_BOOST, evidence.FOCUS_BONUS = 0, 0.0

    chosen = (evidence.NAMED_BOOST, evidence.FOCUS_BONUS)

    def medask() -> None:
        evidence.NAMED_BOOST, evidence.FOCUS_BONUS = chosen

    return {"bm25": bm25, "medask": medask}


def main() -> None:
    from training.data import heldout_rows, train_rows

    p = argparse.ArgumentParser()
    p.add_argument("--pack", default="model_artifacts/evidence")
    args = p.parse_args()
    pack = EvidencePack.load(Path(args.pack))
    test, n_test = liveqa(pack, "liveqa_2017_medical_test.jsonl")
    train_q, n_train = liveqa(pack, "liveqa_2017_medical_train.jsonl")
    sample = train_rows(None)
    random.Random(0).shuffle(sample)
    sample = sample[:300]
    held = heldout_rows()
    rows = []
    for name, use in pipelines().items():
        use()
        for set_name, m in (
            ("LiveQA test", rank_metrics(pack, test)),
            ("LiveQA train (tuning)", rank_metrics(pack, train_q)),
            ("MedText held-out", medtext_recall(pack, held, exclude_own=False)),
            ("MedText train (tuning)", medtext_recall(pack, sample, exclude_own=True)),
        ):
            rows.append(
                {"pipeline": name, "set": set_name, **{k: v if v is None else round(v, 3) for k, v in m.items()}}
            )
    pipelines()["medask"]()
    report(
        "Retrieval: BM25 alone vs MedAsk's (named conditions boosted, focus rerank)",
        rows,
        {
            "liveqa_test_questions": n_test,
            "liveqa_test_covered": len(test),
            "liveqa_train_questions": n_train,
            "liveqa_train_covered": len(train_q),
            "weights": {"named_boost": evidence.NAMED_BOOST, "focus_bonus": evidence.FOCUS_BONUS},
            "pack": pack.info(),
        },
    )


if __name__ == "__main__":
    main()
