"""GPTQ 4-bit with GPTQModel, calibrated on MedText train text only.

GPTQModel is called directly (load -> quantize -> save): that path writes the
standard v1 GPTQ format (``quant_method: gptq``, packed qweight/qzeros/scales)
that vLLM and transformers load, and keeps calibration text out of config.json.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from training.config import Recipe
from training.data import train_rows
from training.evidence import CasePrompter, case_prompter
from training.hf import load_tokenizer
from training.stages import Stage, write_json


@contextlib.contextmanager
def _scratch_cwd() -> Iterator[None]:
    # GPTQModel writes logs/ into the working directory
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="medask-gptq-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


def calibration_texts(prompter: CasePrompter, limit: int, train_limit: int | None) -> list[str]:
    rows = train_rows(train_limit)[:limit]
    return [prompter(r) + r.completion for r in rows]


def run_quantize(stage: Stage, dpo_stage: Path, recipe: Recipe) -> Path:
    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig

    cfg = recipe.quantize
    work = stage.begin_fresh()
    tokenizer = load_tokenizer(dpo_stage)
    texts = calibration_texts(
        case_prompter(tokenizer, recipe, stage.work), cfg.calibration_rows, recipe.data.train_rows
    )
    write_json(
        work / "calibration_ids.json", [r.id for r in train_rows(recipe.data.train_rows)[: cfg.calibration_rows]]
    )
    qcfg = QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act)
    src = str(Path(dpo_stage).resolve())
    dst = str(work.resolve())
    with _scratch_cwd():
        model = GPTQModel.load(src, qcfg, dtype=torch.float16)
        model.quantize(texts, batch_size=1, tokenizer=tokenizer)
        model.save(dst)
    tokenizer.save_pretrained(work)
    return stage.finish({"calibration_rows": len(texts), "bits": cfg.bits, "group_size": cfg.group_size})
