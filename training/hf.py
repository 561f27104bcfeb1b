"""What SFT and DPO share: loading a stage's model, Trainer settings, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from app.clinical.prompting import CHAT_TEMPLATE
from training.config import Recipe
from training.stages import write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(folder: Path) -> Any:
    """The stage's tokenizer, carrying our chat template and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: Path, recipe: Recipe) -> Any:
    """Float32 master weights, whatever ``recipe.dtype`` says: AdamW on half-precision weights underflows
    (its eps is 1e-8) and the paper's float16 recipe turned every weight NaN after one DPO step on a CPU.
    ``recipe.dtype`` is the compute precision (mixed precision on a GPU: ``common_args``) and the precision
    each stage saves its model in (``save_model``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def save_model(model: Any, out: Path, recipe: Recipe) -> None:
    """A stage's model on disk in the recipe's precision (a 7B model in float16: half of float32)."""
    model.to(DTYPES[recipe.dtype]).save_pretrained(out)


def common_args(recipe: Recipe, output_dir: Path, save_steps: int) -> dict[str, Any]:
    """TrainingArguments every stage uses: CPU unless a GPU is there, no hub, no trackers."""
    on_gpu = torch.cuda.is_available()
    return {
        "output_dir": str(output_dir),
        "seed": recipe.seed,
        "use_cpu": not on_gpu,
        # mixed precision on a GPU (float32 master weights); a CPU computes in float32 (its float16 is emulated)
        "bf16": on_gpu and recipe.dtype == "bfloat16",
        "fp16": on_gpu and recipe.dtype == "float16",
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": 1,
        "dataloader_num_workers": 0,
        "push_to_hub": False,
        "disable_tqdm": False,
        "lr_scheduler_type": "cosine",
    }


def train_resumable(trainer: Any, tokenizer: Any, out: Path, name: str, recipe: Recipe) -> int:
    """Train (resuming from the newest Trainer checkpoint), save into ``out``, drop the checkpoints.

    Returns the number of optimizer steps taken over the whole run.
    """
    trainer_dir = Path(trainer.args.output_dir)
    ckpts = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [c for c in ckpts if _checkpoint_complete(c)]
    for broken in set(ckpts) - set(complete):  # a kill while the Trainer was writing it
        print(f"[{name}] discarding incomplete {broken.name}", flush=True)
        shutil.rmtree(broken, ignore_errors=True)
    ckpts = complete
    resume = str(ckpts[-1]) if ckpts else None
    if resume:
        print(f"[{name}] resuming from {ckpts[-1].name}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    save_model(trainer.model, out, recipe)
    tokenizer.save_pretrained(out)
    write_json(out / "train_log.json", trainer.state.log_history)
    shutil.rmtree(trainer_dir, ignore_errors=True)
    return int(trainer.state.global_step)


def _checkpoint_complete(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last, so a readable one marks a finished checkpoint."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True
