"""Held-out evaluation of every stage, the report and its plots.

All numbers come from ``app.clinical.scoring`` on the held-out split, with the prompt
built by ``app.clinical.prompting``: exactly what the service's /perplexity endpoint
computes. DPO reward accuracy uses held-out *mismatched* pairs (never seen in
training) with the SFT model as reference, as DPO's implicit reward defines it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from app.clinical.scoring import Score, combine, score_texts
from training.config import Recipe
from training.data import MedTextRow, heldout_rows, role_for_case
from training.evidence import CasePrompter, case_prompter
from training.graph import MODEL_STAGES
from training.preferences import mismatched_negatives, shuffled_negatives
from training.report import plots, render_report
from training.stages import Stage, read_log, write_json

PAPER = {"dpo_gptq_perplexity": 1.98, "baseline_perplexity": 12.5}


def load_stage_model(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from training.hf import load_tokenizer

    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype="auto" if (folder / "quantize_config.json").exists() else torch.float32
    )
    model.eval()
    return model, tokenizer


def run_evaluate(stage: Stage, work: Path, recipe: Recipe) -> Path:
    out = stage.begin_fresh()
    rows = heldout_rows(recipe.data.eval_rows)
    # both kinds of mismatched pair, whichever the recipe trained on: the nearest
    # case's answer (hard) and a random other case's (another topic)
    negatives = {"nearest": mismatched_negatives(rows), "shuffled": shuffled_negatives(rows, recipe.seed)}
    write_json(out / "medtext_ids.json", [r.id for r in rows])
    bs = recipe.evaluate.batch_size
    beta = recipe.dpo.beta

    chosen: dict[str, list[Score]] = {}
    rejected: dict[str, dict[str, list[Score]]] = {kind: {} for kind in negatives}
    # a stage folder without a model (GPTQ turned off) is not evaluated
    stages = [s for s in MODEL_STAGES if (Stage(work, s).model_dir / "config.json").is_file()]
    samples: list[dict[str, Any]] = []
    generations: list[dict[str, Any]] = []
    plain: dict[str, list[Score]] = {}
    for name in stages:
        folder = Stage(work, name).model_dir
        model, tokenizer = load_stage_model(folder)
        prompter = case_prompter(tokenizer, recipe, work)
        prompts = [prompter(r) for r in rows]
        chosen[name] = score_answers(model, tokenizer, rows, bs, prompter)
        if recipe.evidence.enabled:  # the same model without evidence: what retrieval is worth
            plain[name] = score_answers(model, tokenizer, rows, bs)
        for kind, texts in negatives.items():
            rejected[kind][name] = score_texts(model, tokenizer, list(zip(prompts, texts, strict=True)), bs)
        if name == stages[-1]:
            generations = _heldout_generations(model, tokenizer, rows, prompts, recipe)
            for g, row in zip(generations, rows, strict=True):
                g["citations"] = [
                    {"title": p.title, "source": p.source, "url": p.url} for p in prompter.evidence(row)[0]
                ]
            samples = generations[: recipe.evaluate.samples]
        print(f"[eval] {name}: bits/byte {combine(chosen[name]).bits_per_byte:.4f}")
        del model

    metrics: dict[str, dict[str, Any]] = {}
    for name in stages:
        total = combine(chosen[name])
        m: dict[str, Any] = total.metrics()
        m["mean_answer_logprob"] = sum(s.sum_logprob for s in chosen[name]) / len(rows)
        if name in plain:
            m["no_evidence"] = combine(plain[name]).metrics()
        for kind in negatives:
            m[f"pref_accuracy_per_token_{kind}"] = _mean(
                c.mean_logprob > r.mean_logprob for c, r in zip(chosen[name], rejected[kind][name], strict=True)
            )
        if name in ("dpo", "gptq") and "sft" in chosen:
            rc = [beta * (c.sum_logprob - ref.sum_logprob) for c, ref in zip(chosen[name], chosen["sft"], strict=True)]
            m["reward_chosen"] = _mean(rc)
            for kind in negatives:
                rr = [
                    beta * (r.sum_logprob - ref.sum_logprob)
                    for r, ref in zip(rejected[kind][name], rejected[kind]["sft"], strict=True)
                ]
                m[f"reward_accuracy_{kind}"] = _mean(a > b for a, b in zip(rc, rr, strict=True))
                m[f"reward_margin_{kind}"] = _mean(a - b for a, b in zip(rc, rr, strict=True))
            # the headline: pairs of the kind DPO trained on
            m["reward_accuracy"] = m[f"reward_accuracy_{recipe.dpo.mismatch}"]
            m["reward_margin"] = m[f"reward_margin_{recipe.dpo.mismatch}"]
        metrics[name] = m

    final = stages[-1]
    result = {
        "eval_rows": len(rows),
        # per-row log-likelihoods of the published model, so anyone can recheck a sample
        "per_row": {
            "stage": final,
            "rows": {
                r.id: {"sum_logprob": s.sum_logprob, "tokens": s.tokens, "bytes": s.bytes}
                for r, s in zip(rows, chosen[final], strict=True)
            },
        },
        "heldout_rows_total": len(heldout_rows()),
        "stages": metrics,
        "heldout_generation": _generation_summary(generations, recipe),
        "evidence": _evidence_summary(recipe, work, rows),
        "dpo": _dpo_summary(work, metrics),
        "paper": PAPER,
    }
    write_json(out / "metrics.json", result)
    write_json(out / "samples.json", samples)
    plots(work, out / "plots", metrics)
    (out / "report.md").write_text(render_report(recipe, result, samples), encoding="utf-8")
    return stage.finish({"eval_rows": len(rows)})


def score_answers(
    model: Any, tokenizer: Any, rows: Sequence[MedTextRow], batch_size: int = 8, prompter: CasePrompter | None = None
) -> list[Score]:
    """Each case's gold answer given its served prompt (with its evidence when the prompter
    retrieves it): the quantity every held-out number is made of."""
    prompter = prompter or CasePrompter(tokenizer)
    return score_texts(model, tokenizer, [(prompter(r), r.completion) for r in rows], batch_size)


def _mean(values: Any) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else float("nan")


@torch.inference_mode()
def _heldout_generations(
    model: Any, tokenizer: Any, rows: list, prompts: list[str], recipe: Recipe
) -> list[dict[str, Any]]:
    """The published model's greedy answer to every held-out question, with its perplexity
    (teacher-forced, as the service reports it) and the quality gate's verdict."""
    from app.clinical.quality import assess

    max_new = recipe.evaluate.sample_max_new_tokens
    tokenizer.padding_side = "left"
    answers: list[str] = []
    bs = recipe.evaluate.batch_size
    for lo in range(0, len(prompts), bs):
        enc = tokenizer(prompts[lo : lo + bs], return_tensors="pt", add_special_tokens=False, padding=True)
        gen = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        width = enc["input_ids"].shape[1]
        answers += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    scored = [(p, a if a else tokenizer.eos_token) for p, a in zip(prompts, answers, strict=True)]
    scores = score_texts(model, tokenizer, scored, bs)
    out = []
    for row, answer, score in zip(rows, answers, scores, strict=True):
        quality = assess(answer, row.prompt, score.perplexity)
        out.append(
            {
                "id": row.id,
                "role": role_for_case(row.prompt),
                "question": row.prompt,
                "gold": row.completion,
                "generated": answer,
                "perplexity": score.perplexity,
                "degenerate": quality.degenerate,
                "reasons": list(quality.reasons),
            }
        )
    return out


def _evidence_summary(recipe: Recipe, work: Path, rows: list[MedTextRow]) -> dict[str, Any] | None:
    if not recipe.evidence.enabled:
        return None
    from app.clinical.evidence import EvidencePack
    from training.evidence import retrieval_quality

    pack = EvidencePack.load(work / "evidence" / "pack")
    return {
        "k": recipe.evidence.k,
        "max_tokens": recipe.evidence.max_tokens,
        "pack": {
            **{k: pack.manifest.get(k) for k in ("name", "documents", "passages", "sources", "corpus_sha256")},
            "pack_sha256": pack.pack_sha256,  # the service refuses a pack of this name with another digest
        },
        "retrieval": retrieval_quality(pack, rows, 5),
    }


def _generation_summary(generations: list[dict[str, Any]], recipe: Recipe) -> dict[str, Any]:
    """What the service compares a served answer with: the distribution of the same model's
    greedy held-out answers (perplexity percentiles) and how often they were degenerate."""
    n = max(len(generations), 1)
    reasons: dict[str, int] = {}
    for g in generations:
        for r in g["reasons"]:
            reasons[r] = reasons.get(r, 0) + 1
    return {
        "rows": len(generations),
        "max_new_tokens": recipe.evaluate.sample_max_new_tokens,
        "decoding": "greedy",
        "perplexities": sorted(round(g["perplexity"], 4) for g in generations),
        "degenerate_rate": sum(g["degenerate"] for g in generations) / n,
        "degenerate_reasons": reasons,
    }


def _dpo_summary(work: Path, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What happened to logps/chosen during DPO: the likelihood-displacement check."""
    steps = [h for h in read_log(work / "dpo" / "train_log.json") if "logps/chosen" in h]
    summary: dict[str, Any] = {"steps": len(steps)}
    done = work / "dpo" / "STAGE_DONE.json"
    if done.is_file():  # built pairs and clinicians' feedback pairs, counted apart
        summary["pairs_by_source"] = json.loads(done.read_text()).get("pairs_by_source")
    if steps:
        k = max(1, len(steps) // 10)
        first, last = steps[:k], steps[-k:]
        for key in ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies"):
            summary[f"{key} first"] = _mean(h[key] for h in first)
            summary[f"{key} last"] = _mean(h[key] for h in last)
    if "sft" in metrics and "dpo" in metrics:
        summary["heldout_chosen_logprob_sft"] = metrics["sft"]["mean_answer_logprob"]
        summary["heldout_chosen_logprob_dpo"] = metrics["dpo"]["mean_answer_logprob"]
        summary["heldout_ppl_change_vs_sft"] = metrics["dpo"]["perplexity"] / metrics["sft"]["perplexity"] - 1
    return summary


def backfill_generation(checkpoint: Path, recipe: Recipe) -> dict[str, Any]:
    """Add the held-out generation reference to a checkpoint published before the evaluation stage
    wrote it: the same greedy answers and summary the stage writes now. The manifest's own entry is
    not among its file digests, so the checkpoint still verifies."""
    from app.manifest import MANIFEST, read_manifest

    rows = heldout_rows(recipe.data.eval_rows)
    model, tokenizer = load_stage_model(checkpoint)
    prompter = CasePrompter(tokenizer)
    generations = _heldout_generations(model, tokenizer, rows, [prompter(r) for r in rows], recipe)
    manifest = read_manifest(checkpoint)
    manifest["heldout_generation"] = _generation_summary(generations, recipe)
    write_json(checkpoint / MANIFEST, manifest)
    return manifest["heldout_generation"]
