"""The training pipeline end to end on the ci recipe: checkpoint, leakage, resume, publish safety."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from app.manifest import read_manifest, verify_checkpoint
from tests.conftest import CI_RECIPE, ROOT, run_training
from training.config import RecipeError, load_recipe
from training.data import heldout_ids


def test_checkpoint_is_standard_gptq_4bit(ci_checkpoint: Path) -> None:
    config = json.loads((ci_checkpoint / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == 4 and q["group_size"] == 128
    assert q.get("checkpoint_format", q.get("format")) == "gptq"
    with safe_open(ci_checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith("qweight") for k in keys)
    assert any(k.endswith("qzeros") for k in keys) and any(k.endswith("scales") for k in keys)
    # calibration text must not be copied into the config
    assert "dataset" not in q


def test_checkpoint_loads_and_generates(ci_checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ci_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(ci_checkpoint)
    enc = tok("A 40-year-old woman presents with", return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert tok.chat_template and "<|assistant|>" in tok.chat_template


def test_manifest_describes_and_verifies(ci_checkpoint: Path) -> None:
    assert verify_checkpoint(ci_checkpoint) == []
    m = read_manifest(ci_checkpoint)
    assert set(m["metrics"]) == {"base", "sft", "dpo", "gptq"}
    for stage in m["metrics"].values():
        assert stage["bits_per_byte"] > 0 and stage["word_perplexity"] >= stage["perplexity"] > 1
    assert m["quantization"]["method"] == "gptq"
    assert m["data"]["heldout_rows"] == 141
    assert m["libraries"]["transformers"]
    report = (ci_checkpoint / "report.md").read_text()
    assert "1.98" in report and "not comparable" in report
    for png in ("training_loss.png", "dpo_rewards.png", "perplexity_by_stage.png"):
        assert (ci_checkpoint / "plots" / png).stat().st_size > 1000


def test_no_stage_sees_heldout_rows(ci_run: dict[str, Path]) -> None:
    work = ci_run["work"]
    held = heldout_ids()
    for stage in ("sft", "dpo"):
        used = set(json.loads((work / stage / "medtext_ids.json").read_text()))
        assert used and used.isdisjoint(held), f"{stage} trained on held-out rows"
    calib = set(json.loads((work / "gptq" / "calibration_ids.json").read_text()))
    assert calib and calib.isdisjoint(held)
    evaluated = set(json.loads((work / "eval" / "medtext_ids.json").read_text()))
    assert evaluated <= held
    # DPO pairs: neither answer may be a held-out completion
    from training.data import contains_heldout

    for pair in json.loads((work / "dpo" / "pairs.json").read_text()):
        assert not contains_heldout(pair["prompt"] + pair["chosen"] + pair["rejected"])


def test_unknown_recipe_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CI_RECIPE.read_text() + "\nsft_typo: 1\n")
    with pytest.raises(RecipeError, match="sft_typo"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="learning_rat"):
        load_recipe(CI_RECIPE, ["dpo.learning_rat=1"])


def test_publish_refuses_a_different_checkpoint(ci_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "taken"
    shutil.copytree(ci_run["out"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["recipe_fingerprint"] = "someone-elses"
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in out.iterdir())
    proc = run_training(
        "run", "--recipe", str(CI_RECIPE), "--out", str(out), "--work", str(ci_run["work"]), check=False
    )
    assert proc.returncode == 2 and "different checkpoint" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "manifest.json").read_text())["recipe_fingerprint"] == "someone-elses"
    # with --force it is replaced by a verified checkpoint
    run_training("run", "--recipe", str(CI_RECIPE), "--out", str(out), "--work", str(ci_run["work"]), "--force")
    assert verify_checkpoint(out) == []


# stage killed -> (stages copied in first, what shows the stage is under way, what the rerun says)
KILL_POINTS = {
    "sft": (
        ("base", "evidence"),
        "sft.partial/trainer/checkpoint-*/trainer_state.json",
        "[sft] resuming from checkpoint-",
    ),
    "dpo": (
        ("base", "evidence", "sft"),
        "dpo.partial/trainer/checkpoint-*/trainer_state.json",
        "[dpo] resuming from checkpoint-",
    ),
    "gptq": (
        ("base", "evidence", "sft", "dpo"),
        "gptq.partial/calibration_ids.json",
        "[gptq] discarding an interrupted partial run",
    ),
}


# sft and dpo resume through the same code (training.hf.train_resumable, from the Trainer's newest complete
# checkpoint): sft stands for both, which keeps the suite inside its 15 minutes; dpo stays in KILL_POINTS
@pytest.mark.parametrize("stage", ["sft", "gptq"])
def test_killed_run_resumes_and_publishes(ci_run: dict[str, Path], tmp_path: Path, stage: str) -> None:
    """SIGKILL the run inside a stage (after a Trainer checkpoint where there is one); the rerun
    resumes, publishes a verified checkpoint and leaves no temporary folder."""
    done, underway, resumed = KILL_POINTS[stage]
    work, out = tmp_path / "work", tmp_path / "ckpt"
    work.mkdir()
    for name in done:
        shutil.copytree(ci_run["work"] / name, work / name)
    cmd = [sys.executable, "-m", "training", "run", "--recipe", str(CI_RECIPE), "--out", str(out), "--work", str(work)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(work.glob(underway)):
        assert proc.poll() is None, "run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (work / stage).exists()
    rerun = run_training(*cmd[3:])
    assert resumed in rerun.stdout, rerun.stdout
    assert verify_checkpoint(out) == []
    assert not list(out.parent.glob(".ckpt.tmp-*"))


@pytest.mark.parametrize("where", ["parent-is-a-file", "read-only-filesystem"])
def test_unwritable_output_is_refused_before_training(tmp_path: Path, where: str) -> None:
    if where == "parent-is-a-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        out = blocker / "ckpt"
    else:
        out = Path("/proc/medask-ckpt")  # procfs refuses new entries, even to root
    work = tmp_path / "work"
    proc = run_training("run", "--recipe", str(CI_RECIPE), "--out", str(out), "--work", str(work), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not writable" in proc.stderr and str(out) in proc.stderr
    assert not work.exists()  # refused before any training started


@pytest.mark.parametrize("name", ["ci", "default", "paper"])
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(ROOT / "training" / "recipes" / f"{name}.yaml")
    assert recipe.name == name
    if name == "paper":
        assert recipe.dpo.negatives == "space" and recipe.dpo.lr == 5e-7
        assert recipe.dpo.batch_size == 2 and recipe.dpo.epochs == 10 and recipe.dpo.optimizer.startswith("adamw")
        assert recipe.quantize.bits == 4 and recipe.base.path
    else:
        assert recipe.dpo.negatives == "mismatched" and recipe.base.path is None


def test_negative_strategies(ci_run: dict[str, Path]) -> None:
    """space and sampled negatives build real triples; mismatched picks another case's answer."""
    from transformers import AutoModelForCausalLM

    from training.data import train_rows
    from training.evidence import CasePrompter
    from training.hf import load_tokenizer
    from training.preferences import preference_pairs

    rows = train_rows(4)
    tok = CasePrompter(load_tokenizer(ci_run["work"] / "sft"))  # the prompts without evidence
    model = AutoModelForCausalLM.from_pretrained(ci_run["work"] / "sft")
    space = preference_pairs(rows, tok, "space")
    assert [p["rejected"] for p in space] == [" "] * 4
    sampled = preference_pairs(rows, tok, "sampled", model=model, max_new_tokens=6, seed=3)
    assert all(p["rejected"].strip() and p["rejected"] != p["chosen"] for p in sampled)
    mismatched = preference_pairs(rows, tok, "mismatched")
    golds = {r.completion for r in rows}
    assert all(p["rejected"] in golds and p["rejected"] != p["chosen"] for p in mismatched)
    assert all(p["prompt"].endswith("<|assistant|>\n") for p in mismatched)
    rows = train_rows(40)
    shuffled = preference_pairs(rows, tok, "mismatched", seed=5, mismatch="shuffled")
    assert shuffled == preference_pairs(rows, tok, "mismatched", seed=5, mismatch="shuffled")  # seeded
    assert all(p["rejected"] != p["chosen"] for p in shuffled)
    assert sorted(p["rejected"] for p in shuffled) == sorted(r.completion for r in rows)  # a derangement
    nearest = preference_pairs(rows, tok, "mismatched", mismatch="nearest")
    assert [p["rejected"] for p in shuffled] != [p["rejected"] for p in nearest]


def test_half_written_trainer_checkpoint_is_not_resumed_from(tmp_path: Path) -> None:
    """A kill while the Trainer writes checkpoint-N leaves it without trainer_state.json (written last)."""
    from training.hf import _checkpoint_complete

    done, torn = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    done.mkdir()
    (done / "trainer_state.json").write_text('{"global_step": 4}')
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    assert _checkpoint_complete(done) and not _checkpoint_complete(torn)
    (torn / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert not _checkpoint_complete(torn)


def test_quantize_disabled_publishes_and_serves_the_dpo_model(ci_run: dict[str, Path], tmp_path: Path) -> None:
    """``quantize.enabled: false`` is honoured end to end: no GPTQ stage runs, the DPO model is
    evaluated and published, the manifest says so, and the service serves it."""
    import httpx

    from tests.conftest import start_server, stop_server

    work = tmp_path / "work"
    shutil.copytree(ci_run["work"], work, ignore=shutil.ignore_patterns("gptq", "eval"))
    out = tmp_path / "fp"
    proc = run_training(
        "run", "--recipe", str(CI_RECIPE), "--out", str(out), "--work", str(work), "--set", "quantize.enabled=false"
    )
    assert "[gptq]" in proc.stdout
    assert json.loads((work / "gptq" / "STAGE_DONE.json").read_text())["skipped"] is True
    assert not (work / "gptq" / "model.safetensors").exists()
    m = read_manifest(out)
    assert m["quantization"] == {"method": None} and set(m["metrics"]) == {"base", "sft", "dpo"}
    assert m["heldout_per_row"]["stage"] == "dpo"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any(k.endswith("qweight") for k in f.keys())  # noqa: SIM118
    srv = start_server(out, tmp_path / "s.log")
    try:
        info = httpx.get(f"{srv.base}/info").json()
        assert info["quantization"] == {"quant_method": None} and info["kernel"] == "torch.nn.Linear"
        r = httpx.post(f"{srv.base}/ask", json={"question": "Cough for a week?", "max_new_tokens": 3}, timeout=60)
        assert r.status_code == 200
    finally:
        stop_server(srv)


def test_force_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    """``--force`` on an arbitrary folder (a copy of a repo, someone's data) deletes nothing."""
    out = tmp_path / "v"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    (out / ".git").mkdir()
    proc = run_training(
        "run", "--recipe", str(CI_RECIPE), "--out", str(out), "--work", str(tmp_path / "w"), "--force", check=False
    )
    assert proc.returncode == 2 and "not a published MedAsk checkpoint" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me" and (out / ".git").is_dir()
    assert not (tmp_path / "w").exists()  # refused before any stage ran


def test_a_different_checkpoint_is_refused_before_training(ci_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "taken"
    shutil.copytree(ci_run["out"], out)
    default_recipe = ROOT / "training" / "recipes" / "default.yaml"
    proc = run_training(
        "run", "--recipe", str(default_recipe), "--out", str(out), "--work", str(tmp_path / "w"), check=False
    )
    assert proc.returncode == 2 and "different checkpoint" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_training_prompts_carry_evidence_but_never_their_own_case(ci_run: dict[str, Path]) -> None:
    """The ci recipe trains with evidence: every DPO prompt has an evidence block, and none
    retrieved the case it trains on (its gold answer would be there to copy)."""
    from training.data import train_rows

    pairs = json.loads((ci_run["work"] / "dpo" / "pairs.json").read_text())
    rows = train_rows(load_recipe(CI_RECIPE).data.train_rows)
    assert len(pairs) == len(rows)
    for row, pair in zip(rows, pairs, strict=True):
        assert "Evidence:\n[1] " in pair["prompt"] and pair["prompt"].rstrip().endswith("<|assistant|>")
        assert f"Case: {row.prompt[:60]}" not in pair["prompt"]
    m = read_manifest(ci_run["out"])
    assert m["evidence"]["k"] == 2 and m["evidence"]["pack"]["passages"] > 0
    assert m["metrics"]["gptq"]["no_evidence"]["bits_per_byte"] > 0


def test_the_published_manifest_carries_the_serving_contract(ci_checkpoint: Path) -> None:
    """The typed block says what the old places said (a service reading either serves alike)."""
    from app.clinical.prompting import PROMPT_FORMAT
    from app.manifest import SERVING, read_manifest, serving_contract

    manifest = read_manifest(ci_checkpoint)
    contract = serving_contract(manifest)
    assert contract.source == "manifest" and contract.prompt_format == PROMPT_FORMAT
    legacy = serving_contract({k: v for k, v in manifest.items() if k != SERVING})
    assert legacy.source == "legacy"
    assert (contract.evidence_k, contract.evidence_max_tokens, contract.reference_perplexities) == (
        legacy.evidence_k,
        legacy.evidence_max_tokens,
        legacy.reference_perplexities,
    )
    assert contract.reference_perplexities and contract.evidence_k
