"""Model sizes for the embedded default at one equal pretraining budget: which
size learns most per CPU-minute here? Held-out numbers of each base model.

    python benchmarks/model_sizes.py [--steps 100] [--work runs/sizes]

Each size is pretrained from scratch with the default recipe's data, tokenizer
and schedule, but only ``--steps`` steps (16 x 256 tokens each), through the
real pipeline (``--until base``). Then the gold answers of all held-out rows are
scored given the role prompt and question (bits per byte, token perplexity),
exactly as the evaluation report does. The tokenizer is trained once and
shared, so token perplexities are comparable across the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {  # name: (hidden, layers, heads, MLP); every linear input a multiple of 128 for GPTQ
    "7.6M": (256, 4, 4, 768),
    "16.9M (shipped shape)": (384, 6, 6, 1024),
    "22.0M": (512, 4, 8, 1536),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def heldout_scores(folder: Path) -> dict[str, float]:
    from app.clinical.scoring import combine
    from training.data import heldout_rows
    from training.evaluate import load_stage_model, score_answers

    model, tok = load_stage_model(folder)
    rows = heldout_rows()
    total = combine(score_answers(model, tok, rows))
    return {"rows": len(rows), "bits_per_byte": total.bits_per_byte, "token_ppl": total.perplexity}


def main() -> None:
    from benchmarks.common import report

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--work", default="runs/sizes")
    p.add_argument("--tokenizer-from", default="runs/default/base", help="reuse a trained tokenizer if present")
    args = p.parse_args()
    rows = []
    for name, (hidden, layers, heads, mlp) in SIZES.items():
        work = ROOT / args.work / name.split()[0]
        partial = work / "base.partial"
        src = ROOT / args.tokenizer_from
        if not (work / "base").is_dir() and all((src / f).is_file() for f in TOKENIZER_FILES):
            partial.mkdir(parents=True, exist_ok=True)
            for f in TOKENIZER_FILES:
                shutil.copy2(src / f, partial / f)
        sets = {
            "base.build.hidden_size": hidden,
            "base.build.num_layers": layers,
            "base.build.num_heads": heads,
            "base.build.intermediate_size": mlp,
            "base.build.steps": args.steps,
            "base.build.warmup_steps": max(1, args.steps // 10),
            "base.build.checkpoint_every": args.steps,
        }
        cmd = [sys.executable, "-m", "training", "run", "--recipe", "training/recipes/default.yaml"]
        cmd += ["--out", str(work / "unused"), "--work", str(work), "--until", "base"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        info = json.loads((work / "base" / "STAGE_DONE.json").read_text())
        rows.append(
            {
                "model": name,
                "shape": f"h{hidden} L{layers} MLP{mlp}",
                "parameters_M": info["parameters"] / 1e6,
                "train_tokens": info["tokens_seen"],
                "train_minutes": info.get("seconds", time.time() - t0) / 60,
                **heldout_scores(work / "base"),
            }
        )
    report(f"base model sizes at an equal budget ({args.steps} steps x 16 x 256 tokens), held-out", rows)


if __name__ == "__main__":
    main()
