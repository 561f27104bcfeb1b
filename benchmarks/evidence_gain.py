"""What retrieved evidence is worth: held-out answer bits per byte of two SFT models from the
same base, one trained with evidence in its prompts and one without, each scored with and
without evidence (2 x 2). Trains the no-evidence SFT into ``<work>-noevidence`` (reusing the
base stage of ``--work``); the evidence-trained SFT is ``<work>/sft``.

    python benchmarks/evidence_gain.py --recipe training/recipes/default.yaml --work runs/default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.evidence import EvidencePack
from app.scoring import combine
from benchmarks.common import report
from training.config import load_recipe
from training.data import heldout_rows
from training.evaluate import load_stage_model, score_answers
from training.evidence import CasePrompter
from training.sft import run_sft
from training.stages import Stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="training/recipes/default.yaml")
    ap.add_argument("--work", default="runs/default")
    ap.add_argument("--rows", type=int, default=None, help="held-out rows to score (default: all)")
    args = ap.parse_args()
    work = Path(args.work)
    plain_work = work.with_name(work.name + "-noevidence")
    plain_work.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe)
    plain_recipe = load_recipe(args.recipe, ["evidence.enabled=false"])
    plain_sft = Stage(plain_work, "sft")
    if not plain_sft.done():  # the same SFT settings from the same base, prompts without evidence (resumable)
        run_sft(plain_sft, work / "base", plain_recipe)
    pack = EvidencePack.load(work / "evidence" / "pack")
    rows = heldout_rows(args.rows)
    table = []
    for name, folder in (("SFT trained with evidence", work / "sft"), ("SFT trained without", plain_work / "sft")):
        model, tok = load_stage_model(folder)
        with_ev = combine(
            score_answers(model, tok, rows, 8, CasePrompter(tok, pack, recipe.evidence.k, recipe.evidence.max_tokens))
        )
        without = combine(score_answers(model, tok, rows, 8))
        table.append(
            {
                "model": name,
                "bits/byte with evidence": round(with_ev.bits_per_byte, 4),
                "bits/byte without": round(without.bits_per_byte, 4),
                "with / without": round(with_ev.bits_per_byte / without.bits_per_byte, 3),
            }
        )
    report(f"Evidence gain on {len(rows)} held-out rows (same base, SFT stage)", table)


if __name__ == "__main__":
    main()
