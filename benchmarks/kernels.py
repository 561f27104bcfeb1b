"""What each kernel of the static step costs in modelling quality: held-out bits/byte computed through
the step's own arithmetic, against the GPTQ checkpoint as the model's forward computes it.

    python benchmarks/kernels.py [--model model_artifacts/default] [--rows 141] [--kernels int8 int4x8-avx2 ...]
        [--kv-caches float32 float16]

A kernel that changes the arithmetic (8-bit activations: int8, int8-avx2, int4x8-avx2) may serve only if held-out bits/byte
stays within +0.5% of the GPTQ checkpoint's; float16 rounds the 4-bit weights times their scales to
fp16; bfloat16 rounds weights and activations. Every configuration scores the gold answers of the
held-out split given their served prompts (the evaluation's number), each prompt and answer run
through ``StaticDecoder.extend`` (the prompt path's kernel and the LM head's), then times the step
at 1 and 16 rows. The decode path at 1-4 rows multiplies the same weights the same way. A float16 KV cache
rounds every key and value (``extend`` reads them back as decode does), a change of arithmetic too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from app.clinical.scoring import combine  # noqa: E402
from app.engine.decode import INT8_MAX_CHANGE_PCT, StaticDecoder, cpu_flags  # noqa: E402
from app.engine.kernels import FOUR_BIT, KERNELS  # noqa: E402
from app.engine.kv import KV_CACHES  # noqa: E402
from app.engine.local import Engine  # noqa: E402
from benchmarks.common import report, step_rate  # noqa: E402
from training.data import heldout_rows  # noqa: E402
from training.evaluate import score_answers  # noqa: E402


class StepAsModel(torch.nn.Module):
    """The static step behind a model's forward (what the scoring code calls): every position's logits
    through ``extend``, one row at a time in slot 0, right padding filled with zeros."""

    def __init__(self, decoder: StaticDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the scoring code asks the model for its device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            n = int(mask.sum())
            logits = self.decoder.extend(0, ids[:n].tolist(), 0, every=True)
            rows.append(torch.nn.functional.pad(logits, (0, 0, 0, input_ids.shape[1] - n)))
        return SimpleNamespace(logits=torch.stack(rows))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="model_artifacts/default")
    p.add_argument("--rows", type=int, default=141)
    p.add_argument("--kernels", nargs="*", default=list(KERNELS), help="kernels to score (default: all)")
    p.add_argument("--kv-caches", nargs="*", default=["float32"], choices=KV_CACHES, help="KV cache dtypes to score")
    args = p.parse_args()
    engine = Engine.load(Path(args.model))
    rows = heldout_rows()[: args.rows]
    with torch.inference_mode():
        reference = combine(score_answers(engine.model, engine.tokenizer, rows)).bits_per_byte
    out: list[dict[str, Any]] = [
        {
            "kernel": "GPTQ checkpoint (model forward, int4)",
            "bits_per_byte": reference,
            "step_tok_s_1_row": None,
            "step_tok_s_16_rows": None,
        }
    ]
    # each kernel with itself as the LM head where it can be one (4-bit kernels: float32), and the 4-bit x
    # 8-bit kernel with the 8-bit head it is admitted with
    configurations = [(k, k if k not in FOUR_BIT else "float32") for k in args.kernels]
    if {"int4x8-avx2", "int8-avx2"} <= set(args.kernels):
        configurations.append(("int4x8-avx2", "int8-avx2"))
    for (kernel, head), cache in ((c, kv) for c in configurations for kv in args.kv_caches):
        decoder = StaticDecoder(
            engine.model, 16, lm_head=head, decode_weights=kernel, prompt_weights=kernel, kv_cache=cache
        )
        with torch.inference_mode():
            bpb = combine(score_answers(StepAsModel(decoder), engine.tokenizer, rows, batch_size=4)).bits_per_byte
        out.append(
            {
                "kernel": f"{kernel} (head {head}, KV cache {cache})",
                "bits_per_byte": bpb,
                "step_tok_s_1_row": round(step_rate(decoder, 1, 48), 1),
                "step_tok_s_16_rows": round(step_rate(decoder, 16, 48), 1),
            }
        )
        print(out[-1], flush=True)
    for r in out:
        r["change_pct"] = round(100 * (r["bits_per_byte"] / reference - 1), 3)
        r["within_0.5pct"] = r["change_pct"] <= INT8_MAX_CHANGE_PCT
        r["bits_per_byte"] = round(r["bits_per_byte"], 5)
    report(
        "Held-out bits/byte through each kernel of the static step",
        out,
        {"cpu_flags": list(cpu_flags()), "heldout_rows": len(rows), "allowed_change_pct": INT8_MAX_CHANGE_PCT},
    )


if __name__ == "__main__":
    main()
