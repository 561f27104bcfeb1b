"""Command line: ``python -m training run --recipe training/recipes/ci.yaml --out out/ckpt``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# quiet and offline by default: nothing here may reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    from training.registry import STAGES

    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) the pipeline and publish a checkpoint")
    run.add_argument("--recipe", required=True, help="a YAML file in training/recipes/")
    run.add_argument("--out", required=True, help="folder to publish the checkpoint to")
    run.add_argument("--work", help="stage folders (default: runs/<recipe name>)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set sft.epochs=1",
    )
    run.add_argument("--until", choices=list(STAGES), help="stop after this stage (no publish)")
    run.add_argument("--force", action="store_true", help="replace a different checkpoint at --out")

    sub.add_parser(
        "split", help="record training/data/split.json for the current data (held-out rows stay held out, by content)"
    )

    ev = sub.add_parser("evidence", help="build an evidence pack (indexed, checksummed passages)")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="JSONL of {id, title, text, url, source}: e.g. a hospital's guidelines")
    src.add_argument(
        "--default", action="store_true", help="the shipped pack: vendored MedQuAD + the MedText train split"
    )
    ev.add_argument("--out", help="pack folder (default with --default: model_artifacts/evidence)")
    ev.add_argument("--name", help="pack name recorded in its manifest")
    ev.add_argument("--force", action="store_true", help="replace a pack whose rebuild differs from its manifest")

    verify = sub.add_parser("verify", help="check a published checkpoint against its manifest")
    verify.add_argument("folder")

    export = sub.add_parser("export", help="export a checkpoint: dequantized weights (hf) or GGUF for llama.cpp")
    export.add_argument("folder", help="a published checkpoint folder")
    export.add_argument("--format", choices=["gguf", "hf"], default="gguf")
    export.add_argument("--out", required=True, help="the GGUF file, or the folder for --format hf")
    export.add_argument("--outtype", default="f32", help="GGUF tensor type for llama.cpp's converter (f32, f16, q8_0)")
    export.add_argument("--llama-cpp", default="runs/llama.cpp/src", help="llama.cpp source tree (its converter)")

    prefs = sub.add_parser("preferences", help="clinicians' feedback as DPO pairs (recipe: dpo.feedback_pairs)")
    prefs.add_argument("--from-feedback", required=True, help="a feedback export (JSON lines) or a database URL")
    prefs.add_argument("--out", required=True, help="the pairs file (JSON lines)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "split":
        from training.data import DataError, write_split

        try:
            record = write_split()
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"held out {record['heldout']} of {record['rows']} rows (seed {record['seed']})")
        return 0
    if args.command == "evidence":
        return _evidence(args)
    if args.command == "preferences":
        from training.feedback import write_pairs

        try:
            counts = write_pairs(args.from_feedback, Path(args.out))
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(
            f"{counts.get('pairs', 0)} pairs written to {args.out}; "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        )
        return 0
    if args.command == "export":
        from training.export import ExportError, export

        try:
            out = export(Path(args.folder), args.format, Path(args.out), args.outtype, Path(args.llama_cpp))
        except ExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"exported {args.folder} -> {out}")
        return 0
    if args.command == "verify":
        from app.manifest import verify_checkpoint

        problems = verify_checkpoint(Path(args.folder))
        for problem in problems:
            print(f"FAIL {problem}")
        print("OK" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0

    import torch

    from training.artifact import PublishError, check_destination, publish
    from training.config import RecipeError, load_recipe
    from training.pipeline import run_pipeline

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from training.data import DataError, heldout_ids

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.base.path and not (Path(recipe.base.path).expanduser() / "config.json").is_file():
            raise RecipeError(f"base.path {recipe.base.path} is not a Hugging Face model folder (no config.json there)")
        heldout_ids()  # a malformed row, or data changed since the split, is named now, not mid-run
        out = Path(args.out)
        if not args.until:  # refused now, not after hours of training
            check_destination(out, force=args.force, fingerprint=recipe.fingerprint())
    except (RecipeError, PublishError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path("runs") / recipe.name
    t0 = time.time()
    result = run_pipeline(recipe, work, until=args.until or "eval")
    if args.until:
        print(f"stopped after {args.until}; stage folders in {work}")
        return 0
    try:
        manifest = publish(work, out, recipe, force=args.force, run_seconds=result.seconds)
    except PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _summary(manifest, out, time.time() - t0, result)
    return 0


def _evidence(args: argparse.Namespace) -> int:
    from training.evidence import DEFAULT_PACK, EvidenceBuildError, build_pack, ensure_default_pack, read_corpus

    t0 = time.time()
    try:
        if args.default:
            manifest, built = ensure_default_pack(Path(args.out) if args.out else DEFAULT_PACK, force=args.force)
        else:
            if not args.out:
                print("error: --out is required with --corpus", file=sys.stderr)
                return 2
            docs = read_corpus(Path(args.corpus))
            manifest, built = build_pack(docs, Path(args.out), args.name or Path(args.out).name, args.force), True
    except EvidenceBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verb = f"built in {time.time() - t0:.0f}s" if built else "verified (up to date)"
    print(
        f"evidence pack {manifest['name']}: {manifest['documents']} documents, {manifest['passages']} passages "
        f"({', '.join(f'{k} {v}' for k, v in manifest['sources'].items())}); {verb}"
    )
    return 0


def _summary(manifest: dict, out: Path, seconds: float, result: object) -> None:
    print("\n" + "=" * 72)
    print(f"MedAsk checkpoint published: {out}")
    print(
        f"recipe {manifest['recipe']['name']}  base {manifest['base_model']}  "
        f"quantization {manifest['quantization'].get('method', 'none')}"
    )
    print(f"{'stage':<6} {'token ppl':>10} {'word ppl':>10} {'bits/byte':>10} {'reward acc':>11}")
    for stage, m in manifest["metrics"].items():
        acc = m.get("reward_accuracy")
        acc_s = f"{acc:.3f}" if isinstance(acc, float) else "-"
        print(
            f"{stage:<6} {m['perplexity']:>10.3f} {m['word_perplexity']:>10.3f} {m['bits_per_byte']:>10.4f} {acc_s:>11}"
        )
    print(
        f"held-out rows {manifest['data']['eval_rows']}; this run {seconds:.0f}s "
        f"(reused: {', '.join(result.reused) or 'none'}); report: {out / 'report.md'}"
    )
    print("=" * 72)


if __name__ == "__main__":
    sys.exit(main())
