"""What retrieved evidence is worth: held-out answer bits per byte of models trained with and
without evidence in their prompts, each scored with and without evidence (models x conditions).

    # published checkpoints (e.g. the previous default, trained without evidence, from git history)
    python benchmarks/evidence_gain.py --model "with evidence=model_artifacts/default" --model "without=/tmp/old"
    # the fair comparison: a no-evidence SFT from the same base as the run's evidence-trained SFT
    python benchmarks/evidence_gain.py --plain-sft --work runs/default

Evidence is retrieved from the run's pack (``<work>/evidence/pack``) or ``--pack``, with the k and
token budget of ``--recipe``; a held-out row is never in a pack.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.clinical.evidence import EvidencePack
from app.clinical.scoring import combine
from benchmarks.common import report
from training.config import load_recipe
from training.data import heldout_rows
from training.evaluate import load_stage_model, score_answers
from training.evidence import DEFAULT_PACK, CasePrompter
from training.sft import run_sft
from training.stages import Stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="training/recipes/default.yaml")
    ap.add_argument("--work", default="runs/default")
    ap.add_argument("--pack", default=None, help="default: <work>/evidence/pack, else model_artifacts/evidence")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--plain-sft", action="store_true", help="train (resumably) and compare a no-evidence SFT")
    ap.add_argument("--rows", type=int, default=None, help="held-out rows to score (default: all)")
    args = ap.parse_args()
    work = Path(args.work)
    recipe = load_recipe(args.recipe)
    pack_dir = Path(args.pack) if args.pack else work / "evidence" / "pack"
    pack = EvidencePack.load(pack_dir if pack_dir.is_dir() else DEFAULT_PACK)
    models = [tuple(m.split("=", 1)) for m in args.model]
    if args.plain_sft:
        plain_work = work.with_name(work.name + "-noevidence")
        plain_sft = Stage(plain_work, "sft")
        if not plain_sft.done():  # the same SFT settings from the same base, prompts without evidence
            run_sft(plain_sft, work / "base", load_recipe(args.recipe, ["evidence.enabled=false"]))
        models += [("SFT trained with evidence", str(work / "sft")), ("SFT trained without", str(plain_sft.final))]
    rows = heldout_rows(args.rows)
    table = []
    for name, folder in models:
        model, tok = load_stage_model(Path(folder))
        grounded = CasePrompter(tok, pack, recipe.evidence.k, recipe.evidence.max_tokens)
        with_ev = combine(score_answers(model, tok, rows, 8, grounded)).bits_per_byte
        without = combine(score_answers(model, tok, rows, 8)).bits_per_byte
        table.append(
            {
                "model": name,
                "bits/byte with evidence": round(with_ev, 4),
                "bits/byte without": round(without, 4),
                "with / without": round(with_ev / without, 3),
            }
        )
    report(
        f"Evidence gain on {len(rows)} held-out rows (k={recipe.evidence.k}, budget {recipe.evidence.max_tokens} "
        f"tokens, pack {pack.manifest.get('name')})",
        table,
    )


if __name__ == "__main__":
    main()
