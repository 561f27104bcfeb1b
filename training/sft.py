"""Supervised fine-tuning on the MedText train split (TRL SFTTrainer).

Examples are prompt/completion pairs: the prompt is the role prompt built by
``app.clinical.prompting`` with a role that fits the case, and the loss falls on the
answer tokens only (TRL's completion_only_loss).
"""

from __future__ import annotations

from pathlib import Path

from training.config import Recipe
from training.data import MedTextRow, train_rows
from training.evidence import CasePrompter, case_prompter
from training.hf import common_args, load_model, load_tokenizer, save_model, train_resumable
from training.stages import Stage, write_json


def sft_examples(prompter: CasePrompter, rows: list[MedTextRow]) -> list[dict[str, str]]:
    return [{"prompt": prompter(r), "completion": r.completion} for r in rows]


def run_sft(stage: Stage, base_stage: Stage, recipe: Recipe) -> Path:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    work = stage.begin()
    src = base_stage.model_dir
    tokenizer = load_tokenizer(src)
    rows = train_rows(recipe.data.train_rows)
    write_json(work / "medtext_ids.json", [r.id for r in rows])
    model = load_model(src, recipe)
    if not recipe.sft.enabled:
        # the paper's setup goes straight to DPO: pass the base through, with our template
        save_model(model, work, recipe)
        tokenizer.save_pretrained(work)
        return stage.finish({"skipped": True, "rows": len(rows)})

    trainer_dir = work / "trainer"
    cfg = recipe.sft
    args = SFTConfig(
        **common_args(recipe, trainer_dir, cfg.save_steps),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of total steps
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(sft_examples(case_prompter(tokenizer, recipe, stage.work), rows)),
        processing_class=tokenizer,
    )
    steps = train_resumable(trainer, tokenizer, work, "sft", recipe)
    return stage.finish({"rows": len(rows), "steps": steps})
