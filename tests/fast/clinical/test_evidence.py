"""Evidence packs and retrieval without a model (fast): build, verify, tamper, retrieve,
the token budget, and the two leakage rules (no held-out row in a pack, no training row
retrieving its own case)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.clinical.evidence import EvidenceError, EvidencePack, Passage, evidence_block, gather
from tests.conftest import ROOT
from training.data import heldout_ids, heldout_rows, train_rows
from training.evidence import CasePrompter, build_pack, default_corpus, read_corpus

DOCS = [
    {
        "id": "g1",
        "title": "Chest pain pathway",
        "text": "Suspected acute coronary syndrome: ECG within 10 minutes, aspirin 300 mg, troponin. " * 30,
        "url": "https://intranet/g1",
        "source": "Hospital guidelines",
    },
    {
        "id": "g2",
        "title": "Sepsis bundle",
        "text": "Take blood cultures, give antibiotics within one hour, measure lactate, give fluids for hypotension.",
        "url": None,
        "source": "Hospital guidelines",
    },
    {
        "id": "g3",
        "title": "Croup",
        "text": "Barking cough and stridor in children: oral dexamethasone; nebulised adrenaline for stridor at rest.",
        "url": "https://intranet/g3",
        "source": "Paediatrics",
    },
]


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "guidelines.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pack_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "hospital"
    proc = subprocess.run(
        [sys.executable, "-m", "training", "evidence", "--corpus", str(corpus), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 documents" in proc.stdout
    return out


def test_a_pack_from_a_corpus_verifies_and_cites(pack_dir: Path) -> None:
    pack = EvidencePack.load(pack_dir)
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    assert manifest["documents"] == 3 and manifest["passages"] == len(pack.passages) > 3  # g1 is chunked
    assert set(manifest["files"]) >= {"passages.jsonl", "index/params.index.json"}
    assert all(p.title == "Chest pain pathway" for p in pack.passages if p.doc_id == "g1")
    top = pack.retrieve("Emergency Physician crushing chest pain acute coronary syndrome ECG", 3)
    assert top[0].doc_id == "g1" and top[0].citation()["url"] == "https://intranet/g1"
    assert len({p.doc_id for p in top}) == len(top)  # one passage per document
    assert len(top[0].citation()["snippet"]) <= 600


def test_retrieval_is_deterministic_and_excludes(pack_dir: Path) -> None:
    pack = EvidencePack.load(pack_dir)
    q = "stridor barking cough child hypotension antibiotics"
    first = [(p.id, p.score) for p in pack.retrieve(q, 3)]
    assert first == [(p.id, p.score) for p in EvidencePack.load(pack_dir).retrieve(q, 3)]
    assert "g3" not in {p.doc_id for p in pack.retrieve(q, 3, exclude_docs={"g3"})}
    assert {p.source for p in pack.retrieve(q, 3, sources={"Paediatrics"})} == {"Paediatrics"}
    assert pack.retrieve("zzzz qqqq", 3) == []


def test_rebuilding_gives_the_same_bytes(corpus: Path, pack_dir: Path, tmp_path: Path) -> None:
    again = build_pack(read_corpus(corpus), tmp_path / "again", "hospital")
    assert again["files"] == json.loads((pack_dir / "manifest.json").read_text())["files"]


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", ":1: not valid JSON"), ('{"id": "a", "title": "t", "source": "s"}', ":1: 'text' must be")],
)
def test_a_malformed_corpus_is_a_one_line_error(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "training", "evidence", "--corpus", str(path), "--out", str(tmp_path / "p")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_tampered_pack_is_refused(pack_dir: Path, tmp_path: Path) -> None:
    altered = _copy(pack_dir, tmp_path / "altered")
    text = (altered / "passages.jsonl").read_text().replace("dexamethasone", "dexamethasonE")
    (altered / "passages.jsonl").write_text(text)
    with pytest.raises(EvidenceError, match=r"passages\.jsonl fails its sha256"):
        EvidencePack.load(altered)
    extra = _copy(pack_dir, tmp_path / "extra")
    (extra / "index" / "extra.npy").write_bytes(b"x")
    with pytest.raises(EvidenceError, match=r"index/extra\.npy is a file the manifest does not list"):
        EvidencePack.load(extra)
    linked = _copy(pack_dir, tmp_path / "linked")
    (linked / "passages.jsonl").unlink()
    (linked / "passages.jsonl").symlink_to(pack_dir / "passages.jsonl")
    with pytest.raises(EvidenceError, match="symbolic link"):
        EvidencePack.load(linked)


def test_the_token_budget_cuts_evidence_never_the_question() -> None:
    huge = Passage("p1", "d1", "Huge", "word " * 5000, None, "s")
    small = Passage("p2", "d2", "Small", "short text", None, "s")
    block = evidence_block([huge, small], words, 50)
    assert words(block) <= 50 and block.startswith("Evidence:\n[1] Huge:") and "[2]" not in block
    assert evidence_block([huge], words, 0) == ""
    # a small budget still fits whole small passages, in order
    assert evidence_block([small, huge], words, 12).count("\n[") >= 1


def test_the_cut_found_from_one_tokenization_is_the_binary_searchs() -> None:
    """``token_ends`` (one tokenization of the cut passage, checked with two exact counts) finds the cut with
    fewer tokenizations and gives the same block, with the shipped checkpoint's tokenizer over real passages,
    spaces, accents and symbols, at every budget; an oracle that lies is caught by the check."""
    import random

    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "model_artifacts" / "default" / "tokenizer.json"))
    calls = {"plain": 0, "ends": 0, "lying": 0}

    def counter(kind: str):
        def count(text: str) -> int:
            calls[kind] += 1
            return len(tok(text, add_special_tokens=False)["input_ids"])

        return count

    def ends(text: str) -> list[int]:
        return [e for _, e in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]

    rng = random.Random(7)
    texts = [d["text"] for d in DOCS] + [r.completion for r in heldout_rows()[:40]]
    texts.append("Febre de 39,5 °C há 3 dias, criança com rigidez de nuca — procure atendimento já.  " * 6)
    for i in range(120):
        passages = [Passage(f"p{j}", f"d{j}", f"T{j}", rng.choice(texts), None, "s") for j in range(3)]
        budget = rng.choice([8, 20, 40, 60, 90, 130, 200])
        plain = evidence_block(passages, counter("plain"), budget)
        assert evidence_block(passages, counter("ends"), budget, ends) == plain, i
        lying = evidence_block(passages, counter("lying"), budget, lambda t: list(range(1, len(t) + 1, 2)))
        assert lying == plain, i
    assert calls["ends"] < 0.75 * calls["plain"], calls


def test_gather_cites_only_what_the_model_saw(pack_dir: Path) -> None:
    pack = EvidencePack.load(pack_dir)
    q = "chest pain sepsis stridor"
    passages, block = gather(pack, "Emergency Physician", q, words, k=3, max_tokens=40)
    assert block.count("\n[") == len(passages) >= 1
    all_three, _ = gather(pack, "Emergency Physician", q, words, k=3, max_tokens=2000)
    assert len(all_three) == 3
    assert gather(None, "GP", q, words) == ([], "")


def test_no_heldout_row_is_in_the_default_corpus() -> None:
    docs = default_corpus(medquad_docs=500)
    ids = {d["id"] for d in docs}
    assert not ids & heldout_ids()
    assert {r.id for r in train_rows()} <= ids
    texts = "\n".join(d["text"] for d in docs)
    assert not any(r.prompt in texts for r in heldout_rows())


def test_no_training_row_retrieves_its_own_case(tmp_path: Path) -> None:
    rows = train_rows(40)
    build_pack(default_corpus(medquad_docs=200, medtext_rows=40), tmp_path / "p", "t")
    pack = EvidencePack.load(tmp_path / "p")
    prompter = CasePrompter(tokenizer=None, pack=pack, k=3, max_tokens=10_000)
    prompter.count_tokens = words  # type: ignore[method-assign]  # counting is all this needs of a tokenizer
    own = 0
    for row in rows:
        cited, _ = prompter.evidence(row)
        assert row.id not in {p.doc_id for p in cited}
        # without the exclusion the case itself is the best match: the rule is what keeps it out
        own += pack.retrieve(row.prompt, 1)[0].doc_id == row.id
    assert own >= len(rows) * 0.8


def test_a_pack_is_pinned_by_a_digest_kept_outside_it(pack_dir: Path, tmp_path: Path) -> None:
    """The probe's attack: passages edited to bad advice and the manifest recomputed, so the pack verifies
    against itself. Pinned (MEDASK_EVIDENCE_SHA256, or the checkpoint naming its pack), it is refused."""
    from tests.conftest import forge_pack

    good = EvidencePack.load(pack_dir)
    assert EvidencePack.load(pack_dir, pin=good.pack_sha256).info()["pinned"] is True
    edited = forge_pack(pack_dir, tmp_path / "edited", "dexamethasone", "rest at home and take an antacid")
    forged = EvidencePack.load(edited)  # verifies against its own, recomputed manifest...
    assert forged.info()["corpus_sha256"] == good.info()["corpus_sha256"]  # ...and declares the original corpus
    assert forged.pack_sha256 != good.pack_sha256  # but what was loaded has another digest
    with pytest.raises(EvidenceError, match="not the pinned pack"):
        EvidencePack.load(edited, pin=good.pack_sha256)


def test_a_condition_the_question_names_is_found_however_much_else_it_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer's question drowns its one condition in words about family and worry; BM25 alone
    follows those words, MedAsk's retrieval searches the named condition harder and ranks passages about it
    up (benchmarks/retrieval.py measures it on LiveQA)."""
    from app.clinical import evidence

    worry = "my son was bitten while hunting in the woods and we are worried, he is tired and his son is worried too"
    docs = [
        {
            "id": "lyme",
            "title": "Lyme disease",
            "text": "Lyme disease is an infection spread by ticks; early antibiotics cure most cases.",
            "source": "MedQuAD",
            "focus": ["Lyme disease"],
            "url": None,
        },
        {
            "id": "camp",
            "title": "Hunting trips",
            "text": f"Advice for families: {worry}. Rest, fluids and sleep help when tired after hunting.",
            "source": "MedQuAD",
            "focus": ["Fatigue"],
            "url": None,
        },
    ]
    build_pack(docs, tmp_path / "p", "t")
    pack = EvidencePack.load(tmp_path / "p")
    question = f"{worry}. Could this be Lyme disease?"
    assert pack.named_conditions(question) == ["lyme disease"]
    assert pack.retrieve(question, 2)[0].doc_id == "lyme"
    monkeypatch.setattr(evidence, "NAMED_BOOST", 0)
    monkeypatch.setattr(evidence, "FOCUS_BONUS", 0.0)
    assert pack.retrieve(question, 2)[0].doc_id == "camp"  # BM25 alone: the worry wins


@pytest.mark.parametrize("n", [5, 300, 3000])
def test_ranking_in_two_parts_is_the_whole_corpus_stable_sort(n: int) -> None:
    """Retrieval sorts the best scores first and the rest only when read: the order must be exactly a
    stable sort of every positive score (ties in corpus order), read to the end or not."""
    import numpy as np

    from app.clinical.evidence import _ranked

    rng = np.random.default_rng(n)
    for _ in range(20):
        scores = np.round(rng.random(n) * 4, 1) - 1  # many ties, some scores <= 0
        whole = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > 0]
        assert list(_ranked(scores)) == whole
