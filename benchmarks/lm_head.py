"""The static decode step's LM head in float32 vs bfloat16: held-out bits per byte and decode speed.

    python benchmarks/lm_head.py [--model model_artifacts/default] [--rows 141]

The LM head is most of the bytes a decode step reads (the default model: 16.8 of 23.6 MB).
bfloat16 halves them; the question is what it costs in modelling quality. Bits per byte is the
evaluation's held-out number (gold answers given their served prompts), computed with the head's
weights and inputs rounded to bfloat16 as the bfloat16 matmul sees them (float32 accumulation);
speed is the static step (eager) at 1 and 16 rows. `MEDASK_LM_HEAD_DTYPE=bfloat16` turns it on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bf16_head(weight):
    """Stands in for lm_head: bfloat16 weights and input, float32 accumulation and output."""
    import torch

    class Bf16Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", weight.detach().bfloat16().float())

        def forward(self, x):
            return x.bfloat16().float() @ self.w.T

    return Bf16Head()


def main() -> None:
    import torch

    from app.clinical.scoring import combine
    from app.engine.decode import StaticDecoder
    from app.engine.local import Engine
    from benchmarks.common import report, step_rate
    from training.data import heldout_rows
    from training.evaluate import score_answers

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--rows", type=int, default=141)
    args = p.parse_args()
    engine = Engine.load(Path(args.model))
    model, rows = engine.model, heldout_rows()[: args.rows]
    out = []
    for dtype in ("float32", "bfloat16"):
        original = model.lm_head
        if dtype == "bfloat16":
            model.lm_head = bf16_head(original.weight)
        with torch.inference_mode():
            score = combine(score_answers(model, engine.tokenizer, rows))
        model.lm_head = original
        decoder = StaticDecoder(model, 16, lm_head=dtype)
        out.append(
            {
                "lm_head": dtype,
                "heldout_rows": len(rows),
                "bits_per_byte": score.bits_per_byte,
                "token_perplexity": score.perplexity,
                "step_tok_s_1_row": step_rate(decoder, 1),
                "step_tok_s_16_rows": step_rate(decoder, 16),
            }
        )
    base = out[0]
    for row in out:
        row["bits_per_byte_change_pct"] = 100 * (row["bits_per_byte"] / base["bits_per_byte"] - 1)
        row["speed_1_row_x"] = row["step_tok_s_1_row"] / base["step_tok_s_1_row"]
        row["speed_16_rows_x"] = row["step_tok_s_16_rows"] / base["step_tok_s_16_rows"]
    report("LM head dtype of the static decode step", out)


if __name__ == "__main__":
    main()
