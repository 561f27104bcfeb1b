"""Direct Preference Optimisation on the MedText train split (TRL DPOTrainer).

The reference model is the SFT model. ``rpo_alpha`` adds TRL's "sft" loss on
the chosen answer (RPO) so that logps/chosen cannot collapse while the margin
grows: the likelihood-displacement failure of plain DPO with hard negatives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import Recipe
from training.data import train_rows
from training.evidence import case_prompter
from training.feedback import load_pairs
from training.hf import common_args, load_model, load_tokenizer, train_resumable
from training.preferences import preference_pairs
from training.stages import Stage, write_json


def run_dpo(stage: Stage, sft_stage: Path, recipe: Recipe) -> Path:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    work = stage.begin()
    cfg = recipe.dpo
    tokenizer = load_tokenizer(sft_stage)
    model = load_model(sft_stage, recipe)
    rows = train_rows(recipe.data.train_rows)
    write_json(work / "medtext_ids.json", [r.id for r in rows])
    pairs_path = work / "pairs.json"
    if pairs_path.is_file():
        import json

        pairs = json.loads(pairs_path.read_text())
    else:
        pairs = preference_pairs(
            rows,
            case_prompter(tokenizer, recipe, stage.work),
            cfg.negatives,
            model,
            cfg.sample_max_new_tokens,
            recipe.seed,
            cfg.mismatch,
        )
        write_json(pairs_path, pairs)

    built = len(pairs)
    if cfg.feedback_pairs:  # clinicians' corrections, prompted as the service prompts them
        pairs = pairs + feedback_prompts(load_pairs(Path(cfg.feedback_pairs)), tokenizer, recipe, stage.work)
    by_source = {"built": built, "feedback": len(pairs) - built}

    losses, weights = ["sigmoid"], [1.0]
    if cfg.rpo_alpha > 0:
        losses.append("sft")
        weights.append(cfg.rpo_alpha)
    trainer_dir = work / "trainer"
    args = DPOConfig(
        **common_args(recipe, trainer_dir, cfg.save_steps),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        optim=cfg.optimizer,
        beta=cfg.beta,
        max_length=cfg.max_length,
        loss_type=losses,
        loss_weights=weights,
        # the reference never changes: one pass of reference log-probs up front
        # halves the forward passes per step
        precompute_ref_log_probs=True,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    steps = train_resumable(trainer, tokenizer, work, "dpo", recipe)
    return stage.finish(
        {
            "rows": len(rows),
            "negatives": cfg.negatives,
            "mismatch": cfg.mismatch,
            "steps": steps,
            "losses": losses,
            "pairs_by_source": by_source,
        }
    )


def feedback_prompts(pairs: list[dict], tokenizer: Any, recipe: Recipe, work: Path) -> list[dict[str, str]]:
    """Feedback pairs as DPO triples: the prompt the service built (role, conversation, the evidence it
    would retrieve), the clinician's correction chosen, the service's answer rejected."""
    from app.clinical.evidence import gather
    from app.clinical.prompting import render_prompt

    prompter = case_prompter(tokenizer, recipe, work)
    out = []
    for p in pairs:
        block = ""
        if prompter.pack is not None:
            _, block = gather(
                prompter.pack, p["role"], p["question"], prompter.count_tokens, prompter.k, prompter.max_tokens
            )
        history = [(t["role"], t["content"]) for t in p.get("history") or []]
        prompt = render_prompt(tokenizer, p["question"], p["role"], block, history)
        out.append({"prompt": prompt, "chosen": p["chosen"], "rejected": p["rejected"]})
    return out
