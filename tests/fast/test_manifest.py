"""Checkpoint verification covers every file a loader may read (fast: a copy of the shipped checkpoint)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.clinical.prompting import PROMPT_FORMAT
from app.manifest import MANIFEST, SERVING, ServingContract, serving_contract, verify_checkpoint
from tests.conftest import ROOT

DEFAULT = ROOT / "model_artifacts" / "default"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DEFAULT, tmp_path / "ckpt"))


@pytest.mark.parametrize(
    "extra",
    [
        "additional_chat_templates/default.jinja",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "model-00001-of-00002.safetensors",
        "adapter_config.json",
    ],
)
def test_a_file_the_manifest_does_not_list_is_refused(ckpt: Path, extra: str) -> None:
    path = ckpt / extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{{ 'injected' }}")
    problems = verify_checkpoint(ckpt)
    assert any(extra in p and "does not list" in p for p in problems), problems
    proc = subprocess.run(
        [sys.executable, "-m", "training", "verify", str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and extra in proc.stdout


@pytest.mark.parametrize("entry", ["../../../../etc/hostname", "/etc/hostname", "plots/../config.json"])
def test_manifest_paths_must_stay_inside_the_folder(ckpt: Path, entry: str) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][entry] = {"sha256": "0" * 64, "bytes": 1}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    assert any("not a plain relative path" in p for p in verify_checkpoint(ckpt))


def test_a_weight_file_that_is_a_link_is_refused(ckpt: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / "model.safetensors", outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    assert any("symbolic link" in p for p in verify_checkpoint(ckpt))


def test_a_linked_folder_is_refused(ckpt: Path, tmp_path: Path) -> None:
    shutil.move(ckpt / "plots", tmp_path / "plots")
    (ckpt / "plots").symlink_to(tmp_path / "plots")
    assert any("symbolic link" in p for p in verify_checkpoint(ckpt))


def test_the_shipped_checkpoint_is_clean() -> None:
    assert verify_checkpoint(DEFAULT) == []


# ---- the serving contract ------------------------------------------------------------------------


def test_a_checkpoint_published_before_the_serving_block_is_read_from_the_old_places() -> None:
    manifest = json.loads((DEFAULT / MANIFEST).read_text())
    assert SERVING not in manifest  # the shipped default predates the block: this is the old reading
    contract = serving_contract(manifest)
    assert contract.source == "legacy"
    assert contract.evidence_k == manifest["recipe"]["evidence"]["k"]
    assert contract.evidence_max_tokens == manifest["recipe"]["evidence"]["max_tokens"]
    assert list(contract.reference_perplexities) == manifest["heldout_generation"]["perplexities"]
    assert contract.prompt_format is None


def test_the_serving_block_is_read_first_and_round_trips() -> None:
    written = ServingContract(
        evidence_k=4, evidence_max_tokens=300, reference_perplexities=(1.5, 2.5), prompt_format=PROMPT_FORMAT
    )
    manifest = {
        SERVING: written.to_json(),
        # the old places disagree: the block wins
        "recipe": {"evidence": {"k": 9, "max_tokens": 99}},
        "heldout_generation": {"perplexities": [7.0]},
    }
    read = serving_contract(json.loads(json.dumps(manifest)))
    assert read == ServingContract(4, 300, (1.5, 2.5), PROMPT_FORMAT, source="manifest")


@pytest.mark.parametrize(
    "block",
    [{"evidence_k": "3", "evidence_max_tokens": -1, "reference_perplexities": "x", "prompt_format": 5}, {}],
)
def test_a_malformed_serving_block_gives_no_value_rather_than_a_wrong_one(block: dict) -> None:
    read = serving_contract({SERVING: block})
    assert read == ServingContract(source="manifest")


def test_a_manifest_with_neither_has_an_empty_contract() -> None:
    assert serving_contract({"name": "x"}) == ServingContract()
