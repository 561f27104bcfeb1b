"""The shipped embedded default model: intact, GPTQ 4-bit, and its numbers reproduce."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from safetensors import safe_open

from app.clinical.evidence import EvidencePack
from app.manifest import read_manifest, verify_checkpoint
from tests.conftest import ROOT

DEFAULT = ROOT / "model_artifacts" / "default"


def test_shipped_checkpoint_matches_its_manifest() -> None:
    assert verify_checkpoint(DEFAULT) == []
    size = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert size <= 40 * 1024 * 1024, f"checkpoint is {size / 2**20:.1f} MB"


def test_shipped_checkpoint_is_gptq_4bit() -> None:
    q = json.loads((DEFAULT / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == 4 and q["group_size"] == 128
    with safe_open(DEFAULT / "model.safetensors", "pt") as f:
        assert sum(k.endswith(".qweight") for k in f.keys()) > 0  # noqa: SIM118 (safe_open is not iterable)


def test_heldout_bits_per_byte_reproduce(tmp_path: Path) -> None:
    """Recompute a sample of held-out rows and compare with the manifest's numbers for the same rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.clinical.scoring import combine
    from training.data import heldout_rows
    from training.evaluate import score_answers
    from training.evidence import CasePrompter

    manifest = read_manifest(DEFAULT)
    per_row = manifest["heldout_per_row"]["rows"]
    rows = [r for r in heldout_rows() if r.id in per_row]
    sample = random.Random(0).sample(rows, 24)
    tok = AutoTokenizer.from_pretrained(DEFAULT)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT)
    prompter = CasePrompter(tok)
    if manifest.get("evidence"):  # the model was evaluated (and trained) with evidence: score it the same way
        pack = _default_pack()
        assert pack.manifest["corpus_sha256"] == manifest["evidence"]["pack"]["corpus_sha256"]
        prompter = CasePrompter(tok, pack, manifest["evidence"]["k"], manifest["evidence"]["max_tokens"])
    scores = score_answers(model, tok, sample, 8, prompter)
    measured = combine(scores).bits_per_byte
    recorded = -sum(per_row[r.id]["sum_logprob"] for r in sample) / (
        sum(per_row[r.id]["bytes"] for r in sample) * math.log(2)
    )
    assert abs(measured - recorded) / recorded < 0.02, (measured, recorded)
    # and the manifest's headline is the aggregate of the rows it lists
    total = -sum(v["sum_logprob"] for v in per_row.values()) / (sum(v["bytes"] for v in per_row.values()) * math.log(2))
    assert math.isclose(total, manifest["metrics"]["gptq"]["bits_per_byte"], rel_tol=1e-6)


def _default_pack() -> EvidencePack:
    """The default evidence pack, rebuilt from the vendored data if needed: the rebuild must match the
    committed manifest byte for byte (ensure_default_pack refuses otherwise)."""
    from training.evidence import DEFAULT_PACK, ensure_default_pack

    ensure_default_pack()
    return EvidencePack.load(DEFAULT_PACK)


def test_default_pack_rebuilds_to_its_manifest_and_holds_no_heldout_row() -> None:
    from training.data import heldout_ids, heldout_rows

    pack = _default_pack()
    assert pack.manifest["sources"] == {"MedQuAD": 15811, "MedText": 1271}
    assert not {p.doc_id for p in pack.passages} & heldout_ids()
    texts = "\n".join(p.text for p in pack.passages if p.source == "MedText")
    assert not any(r.prompt[:80] in texts for r in heldout_rows())


def test_shipped_model_meets_its_quality_goals() -> None:
    """The goals the default model was built to (issue: the embedded default), read from its own manifest."""
    m = json.loads((DEFAULT / "manifest.json").read_text())["metrics"]
    assert m["sft"]["bits_per_byte"] < 0.9 * m["base"]["bits_per_byte"]  # SFT clearly improves on base
    assert m["dpo"]["reward_accuracy"] >= 0.6  # held-out, mismatched pairs of the kind DPO trained on
    assert m["dpo"]["reward_accuracy_nearest"] > 0.55  # and the hardest kind too
    assert m["dpo"]["perplexity"] <= 1.05 * m["sft"]["perplexity"]
    assert m["gptq"]["bits_per_byte"] <= 1.03 * m["dpo"]["bits_per_byte"]
