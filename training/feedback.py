"""Clinicians' feedback as preference pairs for the next DPO round.

``python -m training preferences --from-feedback SOURCE --out FILE`` reads the feedback store (a database URL)
or an admin's export (``GET /feedback/export``, JSON lines) and writes one pair per correction: chosen = the
clinician's correction, rejected = the answer the service gave, with the question, role and conversation it
answered. A down-rated answer without a correction is a rejected candidate with no chosen answer: it is
counted, not paired (DPO needs both). Rows whose text was not stored (``MEDASK_FEEDBACK_STORE_TEXT`` off) have
nothing to train on and are counted apart. A question from the held-out split is refused: no stage may see it.

The ``dpo`` stage reads such a file beside the pairs it builds (``dpo.feedback_pairs`` in a recipe).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from training.stages import write_json


def read_feedback(source: str) -> Iterator[dict[str, Any]]:
    """Exported feedback rows from a JSON-lines file, or straight from the store at a database URL."""
    path = Path(source)
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        return
    if "://" not in source:
        raise ValueError(f"{source} is neither a feedback export file nor a database URL")
    from app.feedback.store import Store

    store = Store.open(source)
    try:
        yield from store.export()
    finally:
        store.close()


def feedback_pairs(
    rows: Iterable[dict[str, Any]], heldout_questions: set[str]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(pairs, counts): one pair per stored correction; counts say what was skipped and why."""
    pairs: list[dict[str, Any]] = []
    counts: Counter = Counter()
    for row in rows:
        answer = row.get("answer") or {}
        counts["feedback"] += 1
        if row.get("rating") == "down":
            counts["down_rated"] += 1
        if not row.get("correction"):
            counts["no_correction"] += 1
            continue
        if answer.get("question") is None or answer.get("answer") is None:
            counts["text_not_stored"] += 1
            continue
        if _key(answer["question"]) in heldout_questions:
            counts["heldout_refused"] += 1
            continue
        pairs.append(
            {
                "source": "feedback",
                "feedback_id": row.get("feedback_id"),
                "question": answer["question"],
                "role": answer.get("role") or "General Practitioner",
                "history": answer.get("history") or [],
                "chosen": row["correction"],
                "rejected": answer["answer"],
            }
        )
        counts["pairs"] += 1
    return pairs, dict(counts)


def heldout_questions() -> set[str]:
    from training.data import heldout_rows

    return {_key(r.prompt) for r in heldout_rows()}


def _key(question: str) -> str:
    return " ".join(question.lower().split())


def write_pairs(source: str, out: Path) -> dict[str, int]:
    pairs, counts = feedback_pairs(read_feedback(source), heldout_questions())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps(p, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return counts


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """A pairs file for the dpo stage, checked: every pair complete, none from the held-out split."""
    held = heldout_questions()
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        p = json.loads(line)
        for field in ("question", "chosen", "rejected"):
            if not isinstance(p.get(field), str) or not p[field].strip():
                raise ValueError(f"{path}:{n}: {field!r} must be a non-empty string")
        if _key(p["question"]) in held:
            raise ValueError(f"{path}:{n}: the question is from the held-out split: refused")
        pairs.append(p)
    return pairs


def record(out: Path, counts: dict[str, int]) -> None:
    write_json(out, counts)
