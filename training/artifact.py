"""Publish a checkpoint: model + tokenizer + report + manifest, atomically.

The folder is assembled beside the destination and renamed into place, so a
crash never leaves a folder the service could load half-written.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from app.clinical.prompting import PROMPT_FORMAT
from app.manifest import (
    MANIFEST,
    SERVING,
    ServingContract,
    file_digests,
    read_manifest,
    sha256_file,
    verify_checkpoint,
)
from training.config import Recipe
from training.data import MEDQUAD_PATH, MEDTEXT_PATH, SPLIT_PATH
from training.graph import STAGE_NAMES, published_stage
from training.stages import Stage

__all__ = ["PublishError", "check_destination", "publish", "verify_checkpoint"]

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
LIBRARIES = ("torch", "transformers", "trl", "gptqmodel", "optimum", "tokenizers", "accelerate", "datasets")


class PublishError(RuntimeError):
    """The destination cannot take this checkpoint; nothing was overwritten."""


def check_destination(out: Path, force: bool = False, fingerprint: str | None = None) -> None:
    """Refuse early: an unwritable parent, or a folder holding another checkpoint."""
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # a real write, not os.access: root passes every permission check, but
        # not a read-only filesystem or a path through a file
        probe = parent / f".medask-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PublishError(f"cannot publish to {out}: {parent} is not writable ({exc.strerror or exc})") from exc
    if out.exists() and not out.is_dir():
        raise PublishError(f"cannot publish to {out}: it is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        held = _published_fingerprint(out)
        if held is None:
            # --force replaces a checkpoint this pipeline published, never an arbitrary folder
            raise PublishError(
                f"{out} exists and is not a published MedAsk checkpoint (no manifest written by this pipeline); "
                "refusing to replace it, with or without --force: choose another --out"
            )
        if fingerprint is not None and held != fingerprint and not force:
            raise PublishError(f"{out} already holds a different checkpoint (recipe {held}); use --force to replace it")


def _published_fingerprint(folder: Path) -> str | None:
    """The recipe fingerprint of a checkpoint this pipeline published, or None for any other folder."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    held = manifest.get("recipe_fingerprint")
    return held if isinstance(held, str) else None


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def publish(
    work: Path, out: Path, recipe: Recipe, force: bool = False, run_seconds: dict[str, float] | None = None
) -> dict[str, Any]:
    """Assemble the checkpoint from the stage folders and rename it into ``out``."""
    check_destination(out, force=force, fingerprint=recipe.fingerprint())
    eval_stage = work / "eval"
    src = Stage(work, published_stage(recipe)).model_dir
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for name in MODEL_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        for weights in sorted(src.glob("*.safetensors")) + sorted(src.glob("*.safetensors.index.json")):
            shutil.copy2(weights, tmp / weights.name)
        for name in ("report.md", "metrics.json"):
            shutil.copy2(eval_stage / name, tmp / name)
        if (eval_stage / "plots").is_dir():
            shutil.copytree(eval_stage / "plots", tmp / "plots")
        manifest = _manifest(work, recipe, tmp, run_seconds or {})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n", encoding="utf-8")
        problems = verify_checkpoint(tmp)
        if problems:
            raise PublishError("assembled checkpoint fails verification: " + "; ".join(problems))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _stage_info(work: Path, name: str) -> dict[str, Any]:
    path = work / name / "STAGE_DONE.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _manifest(work: Path, recipe: Recipe, folder: Path, run_seconds: dict[str, float]) -> dict[str, Any]:
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    split = json.loads(SPLIT_PATH.read_text())
    config = json.loads((folder / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    return {
        "name": f"medask-{recipe.name}",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "recipe_fingerprint": recipe.fingerprint(),
        "base_model": recipe.base.path or "embedded default (built from scratch by training/base.py)",
        "architecture": config.get("architectures", ["?"])[0],
        "parameters": _stage_info(work, "base").get("parameters"),
        "recipe": recipe.model_dump(mode="json"),
        "data": {
            "medtext_sha256": sha256_file(MEDTEXT_PATH),
            "medquad_sha256": sha256_file(MEDQUAD_PATH),
            "split_sha256": sha256_file(SPLIT_PATH),
            "split_seed": split["seed"],
            "train_rows": split["train"] if recipe.data.train_rows is None else recipe.data.train_rows,
            "heldout_rows": split["heldout"],
            "eval_rows": metrics["eval_rows"],
        },
        "quantization": {
            "method": qcfg.get("quant_method"),
            "bits": qcfg.get("bits"),
            "group_size": qcfg.get("group_size"),
            "sym": qcfg.get("sym"),
            "desc_act": qcfg.get("desc_act"),
            "checkpoint_format": qcfg.get("checkpoint_format") or qcfg.get("format"),
            "calibration": "MedText train split only",
        }
        if qcfg
        else {"method": None},
        "metrics": metrics["stages"],
        "heldout_per_row": metrics["per_row"],
        # the service places each served answer's perplexity within this distribution
        "heldout_generation": metrics.get("heldout_generation"),
        # the evidence contract the model was trained under (k, token budget, which pack) and retrieval quality
        "evidence": metrics.get("evidence"),
        "dpo": metrics.get("dpo"),
        # what the service reads to serve as the model was trained and evaluated (app.manifest.ServingContract)
        SERVING: ServingContract(
            evidence_k=recipe.evidence.k,
            evidence_max_tokens=recipe.evidence.max_tokens,
            reference_perplexities=tuple((metrics.get("heldout_generation") or {}).get("perplexities") or ()),
            prompt_format=PROMPT_FORMAT,
        ).to_json(),
        "stage_seconds": {name: _stage_info(work, name).get("seconds") for name in STAGE_NAMES},
        "this_run_seconds": run_seconds,
        "libraries": library_versions(),
        "files": file_digests(folder),
    }
