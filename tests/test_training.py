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
    "sft": (("base",), "sft.partial/trainer/checkpoint-*/trainer_state.json", "[sft] resuming from checkpoint-"),
    "dpo": (("base", "sft"), "dpo.partial/trainer/checkpoint-*/trainer_state.json", "[dpo] resuming from checkpoint-"),
    "gptq": (
        ("base", "sft", "dpo"),
        "gptq.partial/calibration_ids.json",
        "[gptq] discarding an interrupted partial run",
    ),
}


@pytest.mark.parametrize("stage", list(KILL_POINTS))
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
    from training.hf import load_tokenizer
    from training.preferences import preference_pairs

    rows = train_rows(4)
    tok = load_tokenizer(ci_run["work"] / "sft")
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
