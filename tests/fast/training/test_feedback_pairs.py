"""Clinicians' feedback as DPO pairs (fast: no model): a correction with its stored text is a pair, a
question from the held-out split is refused, rows without text or without a correction are counted apart;
the CLI writes the file the dpo stage reads, and the dpo stage's key follows that file's content."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from training.config import load_recipe
from training.data import heldout_rows
from training.feedback import feedback_pairs, heldout_questions, load_pairs


def row(question: str | None, answer: str | None, correction: str | None, rating: str = "down") -> dict:
    return {
        "feedback_id": "f",
        "rating": rating,
        "correction": correction,
        "answer": {"question": question, "answer": answer, "role": "Cardiologist", "history": []},
    }


def test_corrections_become_pairs_and_the_rest_is_counted() -> None:
    held = heldout_rows()[0].prompt
    rows = [
        row("Chest pain for an hour?", "Rest at home.", "Call an ambulance: this may be a heart attack."),
        row("Chest pain for an hour?", "Rest at home.", None),  # down-rated, no correction: not a pair
        row(None, None, "A correction whose answer text was not stored"),
        row(held, "anything", "anything better"),  # the held-out split is never trained on
        row("Cough?", "Fine.", None, rating="up"),
    ]
    pairs, counts = feedback_pairs(rows, heldout_questions())
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Call an ambulance: this may be a heart attack.", "Rest at home.")
    ]
    assert counts == {
        "feedback": 5,
        "down_rated": 4,
        "pairs": 1,
        "no_correction": 2,
        "text_not_stored": 1,
        "heldout_refused": 1,
    }


def test_a_pairs_file_with_a_held_out_question_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"question": heldout_rows()[1].prompt, "chosen": "a", "rejected": "b", "role": "GP"}) + "\n"
    )
    with pytest.raises(ValueError, match="held-out"):
        load_pairs(path)


def test_the_cli_writes_pairs_from_an_export_and_the_dpo_key_follows_the_file(tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    export.write_text(
        json.dumps(row("Fever in a 2-week-old?", "Give paracetamol.", "Emergency: sepsis work-up now.")) + "\n"
    )
    out = tmp_path / "pairs.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "training", "preferences", "--from-feedback", str(export), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 pairs written" in proc.stdout and len(load_pairs(out)) == 1
    from training.pipeline import stage_keys

    recipe = load_recipe(ROOT / "training" / "recipes" / "ci.yaml")
    with_pairs = load_recipe(ROOT / "training" / "recipes" / "ci.yaml", [f"dpo.feedback_pairs={out}"])
    before, after = stage_keys(recipe), stage_keys(with_pairs)
    assert before["sft"] == after["sft"] and before["dpo"] != after["dpo"]
    out.write_text(out.read_text().replace("sepsis", "a full sepsis"))
    assert stage_keys(with_pairs)["dpo"] != after["dpo"]  # the file's content is in the key, not just its name
