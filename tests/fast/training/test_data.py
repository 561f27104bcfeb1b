"""The vendored data and the held-out split."""

from __future__ import annotations

import json

from training.data import (
    SPLIT_PATH,
    contains_heldout,
    heldout_rows,
    load_medtext,
    make_split,
    medquad_texts,
    medtext_train_texts,
    role_for_case,
    train_rows,
)


def test_medtext_is_complete() -> None:
    rows = load_medtext()
    assert len(rows) == 1412
    assert len({r.id for r in rows}) == 1412


def test_split_file_matches_seeded_split() -> None:
    record = json.loads(SPLIT_PATH.read_text())
    assert record["heldout_ids"] == make_split(load_medtext(), record["seed"], record["fraction"])
    assert record["heldout"] == 141 and record["train"] == 1271


def test_split_spreads_non_vignettes_over_both_sides() -> None:
    assert any(r.kind == "other" for r in heldout_rows())
    assert any(r.kind == "other" for r in train_rows())
    assert {r.id for r in heldout_rows()}.isdisjoint(r.id for r in train_rows())


def test_pretraining_corpus_has_no_heldout_text() -> None:
    corpus = medquad_texts(3000) + medtext_train_texts()
    assert not any(contains_heldout(doc) for doc in corpus)


def test_leak_detector_catches_a_leak() -> None:
    # the guard above would be vacuous if it could not see a planted leak
    leaked = heldout_rows()[0]
    assert contains_heldout(f"notes\n{leaked.prompt}\n{leaked.completion}")


def test_roles_fit_the_case() -> None:
    assert role_for_case("A 60-year-old man presents with crushing chest pain radiating to his arm.") == "Cardiologist"
    assert role_for_case("A pregnant woman in her third trimester has headaches.") == "Obstetrician-Gynecologist"
    assert role_for_case("How do I fix the transmission in my car?") == "General Practitioner"


def test_a_prepended_row_moves_no_row_across_the_split(tmp_path, monkeypatch) -> None:
    """Data drift: one row prepended shifts every position; membership is by content, so no
    held-out row becomes a training row, and the changed data is refused until the split is recorded."""
    import pytest

    import training.data as data

    before = {(r.prompt, r.completion) for r in heldout_rows()}
    medtext = tmp_path / "medtext.jsonl"
    new_row = json.dumps({"prompt": "A new question?", "completion": "A new answer."})
    medtext.write_text(new_row + "\n" + data.MEDTEXT_PATH.read_text(encoding="utf-8"), encoding="utf-8")
    split = tmp_path / "split.json"
    split.write_text(data.SPLIT_PATH.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(data, "MEDTEXT_PATH", medtext)
    monkeypatch.setattr(data, "SPLIT_PATH", split)
    for cached in (data.load_medtext, data.heldout_ids):
        cached.cache_clear()
    try:
        with pytest.raises(data.DataError, match="changed since"):
            data.heldout_ids()
        record = data.write_split(split)
        after = {(r.prompt, r.completion) for r in data.heldout_rows()}
        assert after == before and record["heldout"] == 141 and record["rows"] == 1413
        assert data.train_rows()[0].prompt == "A new question?"
    finally:
        for cached in (data.load_medtext, data.heldout_ids):
            cached.cache_clear()


def test_changed_data_changes_every_stage_key(tmp_path, monkeypatch) -> None:
    """A stage built from other data is never reused: the keys cover the data files."""
    import training.data as data
    from tests.conftest import CI_RECIPE
    from training.config import load_recipe
    from training.pipeline import stage_keys

    recipe = load_recipe(CI_RECIPE)
    before = stage_keys(recipe)
    medtext = tmp_path / "medtext.jsonl"
    medtext.write_text(
        '{"prompt": "A new question?", "completion": "A new answer."}\n'
        + data.MEDTEXT_PATH.read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    monkeypatch.setattr(data, "MEDTEXT_PATH", medtext)
    after = stage_keys(recipe)
    assert set(before) == set(after) and all(before[k] != after[k] for k in before)
    assert stage_keys(load_recipe(CI_RECIPE)) == after  # and they are stable for the same data
