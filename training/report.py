"""The evaluation report: ``report.md`` (tables per stage, the evidence and quality-gate lines, DPO,
samples) and its plots, rendered from what ``training.evaluate`` measured."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from training.config import Recipe
from training.stages import read_log


def plots(work: Path, out: Path, metrics: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (stage, key, title) in zip(
        axes,
        [
            ("base", "loss", "base pretraining loss"),
            ("sft", "loss", "SFT loss (answer tokens)"),
            ("dpo", "loss", "DPO loss"),
        ],
        strict=True,
    ):
        hist = [h for h in read_log(work / stage / "train_log.json") if key in h and "step" in h]
        if hist:
            ax.plot([h["step"] for h in hist], [h[key] for h in hist])
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "training_loss.png", dpi=90)
    plt.close(fig)

    hist = [h for h in read_log(work / "dpo" / "train_log.json") if "rewards/margins" in h]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if hist:
        steps = [h["step"] for h in hist]
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            axes[0].plot(steps, [h[key] for h in hist], label=key)
        axes[1].plot(steps, [h["logps/chosen"] for h in hist], label="logps/chosen")
        axes[1].plot(steps, [h["logps/rejected"] for h in hist], label="logps/rejected")
    axes[0].set_title("DPO rewards (train batches)")
    axes[1].set_title("DPO log-probs: chosen must not collapse")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dpo_rewards.png", dpi=90)
    plt.close(fig)

    names = list(metrics)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("perplexity", "word_perplexity", "bits_per_byte"), strict=True):
        vals = [metrics[n][key] for n in names]
        ax.bar(names, vals, color=["#999", "#4a7", "#37a", "#a53"][: len(names)])
        ax.set_title(f"held-out {key.replace('_', ' ')}")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "perplexity_by_stage.png", dpi=90)
    plt.close(fig)


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"
    return "-" if x is None else str(x)


def _evidence_lines(ev: dict[str, Any] | None, stages: dict[str, Any]) -> list[str]:
    if not ev:
        return ["## Evidence", "", "This model was trained without retrieved evidence (`evidence.enabled: false`)."]
    r = ev["retrieval"]
    rec = ", ".join(f"{k} {_fmt(v)}" for k, v in r["recall"].items())
    lines = [
        "## Evidence (retrieval-augmented training and serving)",
        "",
        f"Each prompt carries the top {ev['k']} passages (one per document, at most {ev['max_tokens']} tokens) that "
        f"`app/clinical/evidence.py` retrieves for role + question from the pack `{ev['pack']['name']}` "
        f"({ev['pack']['documents']} documents, {ev['pack']['passages']} passages: "
        + ", ".join(f"{k} {v}" for k, v in (ev["pack"]["sources"] or {}).items())
        + "); a training row never retrieves its own case, and no held-out row is in the pack.",
        "",
        f"Retrieval relevance on the held-out rows: recall@{r['k']} (a condition named in the gold answer is the "
        f"focus of a retrieved passage; {r['rows_with_condition']} of {r['rows']} rows name one): {rec}. "
        f"Retrieval latency per query p50 {_fmt(r['latency_ms_p50'], 2)} ms, p99 {_fmt(r['latency_ms_p99'], 2)} ms.",
        "",
        "| stage | bits/byte with evidence | bits/byte without | change |",
        "|---|---|---|---|",
    ]
    for name, m in stages.items():
        if "no_evidence" in m:
            w, wo = m["bits_per_byte"], m["no_evidence"]["bits_per_byte"]
            lines.append(f"| {name} | {_fmt(w, 4)} | {_fmt(wo, 4)} | {(w / wo - 1) * 100:+.1f}% |")
    return lines


def _gate_line(gen: dict[str, Any]) -> str:
    if not gen.get("rows"):
        return "No held-out generations."
    pp = gen["perplexities"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(gen["degenerate_reasons"].items())) or "none"
    return (
        f"The published model's greedy answers (up to {gen['max_new_tokens']} tokens) to all {gen['rows']} held-out "
        f"questions: {gen['degenerate_rate']:.1%} degenerate by `app/clinical/quality.py` (reasons: {reasons}); the service "
        "withholds such answers. Their perplexities (median "
        f"{pp[len(pp) // 2]:.2f}, 10th-90th percentile {pp[len(pp) // 10]:.2f}-{pp[(len(pp) * 9) // 10]:.2f}) are "
        "the reference each served answer's `quality.perplexity_percentile` is measured against. A low perplexity "
        "means the text was predictable to the model, not that it is right: loops score lowest."
    )


def render_report(recipe: Recipe, result: dict[str, Any], samples: list[dict[str, str]]) -> str:
    stages = result["stages"]
    lines = [
        f"# MedAsk checkpoint report: recipe `{recipe.name}`",
        "",
        recipe.description.strip(),
        "",
        f"Every number below is measured on the **held-out split** ({result['eval_rows']} of "
        f"{result['heldout_rows_total']} held-out MedText rows; no stage saw them: not the tokenizer, "
        "pretraining, SFT, DPO or GPTQ calibration). Perplexity is *conditional*: the gold answer's "
        "tokens given the role prompt and the question, computed by `app/clinical/scoring.py` "
        "(lm-evaluation-harness conventions: word perplexity per whitespace word, bits per UTF-8 byte).",
        "",
        "## Held-out metrics by stage",
        "",
        "| stage | token ppl | word ppl | bits/byte | answer tokens | DPO reward acc. (shuffled pairs) "
        "| DPO reward acc. (nearest pairs) | pref. acc. per token (shuffled / nearest) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in stages.items():
        lines.append(
            f"| {name} | {_fmt(m['perplexity'])} | {_fmt(m['word_perplexity'])} | {_fmt(m['bits_per_byte'], 4)} | "
            f"{m['tokens']} | {_fmt(m.get('reward_accuracy_shuffled'))} | {_fmt(m.get('reward_accuracy_nearest'))} | "
            f"{_fmt(m.get('pref_accuracy_per_token_shuffled'))} / {_fmt(m.get('pref_accuracy_per_token_nearest'))} |"
        )
    lines += [
        "| paper (Freitas Filho et al.) | 1.98 (DPO+GPTQ) vs 12.5 (baseline) | - | - | - | - | - | - |",
        "",
        "**Why the paper's row is not comparable.** The paper's 1.98 and 12.5 were not measured on held-out "
        "data, compare models with different tokenizers on different corpora, and are token perplexities, "
        "which depend on the tokenizer's vocabulary. Our numbers are held-out, conditional on the prompt, "
        "and come with word perplexity and bits per byte, which do not depend on the tokenizer; a token "
        "perplexity from another tokenizer cannot be set beside them.",
        "",
        "DPO reward accuracy: the fraction of held-out pairs where the implicit reward "
        f"beta*(log pi - log pi_SFT) of the gold answer beats the rejected one's (beta = {recipe.dpo.beta}). "
        "Two kinds of mismatched pair: *shuffled* (another held-out case's gold answer, drawn at random: "
        "fluent, clinical, usually another topic) and *nearest* (the gold answer of the most similar other "
        "held-out case by BM25: the hardest negative). This model's DPO trained on "
        f"`{recipe.dpo.negatives}` negatives of kind `{recipe.dpo.mismatch}`. Preference accuracy per token "
        "compares mean per-token log-probs of the two answers under the stage's own model (no reference).",
        "",
        "## DPO: what happened to the chosen answers' likelihood",
        "",
    ]
    dpo = result["dpo"]
    if dpo.get("pairs_by_source"):
        src = dpo["pairs_by_source"]
        lines += [
            f"DPO pairs by source: {src.get('built', 0)} built from the train split, {src.get('feedback', 0)} from clinicians' feedback.",
            "",
        ]
    if dpo.get("steps"):
        lines += [
            f"Negatives: `{recipe.dpo.negatives}` (`{recipe.dpo.mismatch}`); RPO NLL weight (`rpo_alpha`): {recipe.dpo.rpo_alpha}. "
            f"Over {dpo['steps']} steps, train-batch logps/chosen went from {_fmt(dpo['logps/chosen first'], 1)} "
            f"to {_fmt(dpo['logps/chosen last'], 1)}, logps/rejected from {_fmt(dpo['logps/rejected first'], 1)} "
            f"to {_fmt(dpo['logps/rejected last'], 1)}, and the reward margin from "
            f"{_fmt(dpo['rewards/margins first'])} to {_fmt(dpo['rewards/margins last'])}.",
        ]
        if "heldout_ppl_change_vs_sft" in dpo:
            change = dpo["heldout_ppl_change_vs_sft"]
            verdict = (
                "did not collapse" if change <= 0.05 else "was displaced (held-out perplexity rose by more than 5%)"
            )
            lines += [
                "",
                f"On held-out rows the mean log-probability of the gold answer went from "
                f"{_fmt(dpo['heldout_chosen_logprob_sft'], 2)} (SFT) to {_fmt(dpo['heldout_chosen_logprob_dpo'], 2)} (DPO), "
                f"a held-out perplexity change of {change * 100:+.2f}%: the chosen likelihood {verdict}.",
            ]
    else:
        lines.append("No DPO training log (stage skipped).")
    lines += ["", *_evidence_lines(result.get("evidence"), stages)]
    lines += [
        "",
        "## Plots",
        "",
        "![training loss](plots/training_loss.png)",
        "",
        "![DPO rewards](plots/dpo_rewards.png)",
        "",
        "![perplexity by stage](plots/perplexity_by_stage.png)",
        "",
        "## Answer quality gate on the held-out questions",
        "",
        _gate_line(result.get("heldout_generation") or {}),
        "",
        f"## Held-out samples ({len(samples)}, greedy decoding, the published model, verbatim)",
        "",
    ]
    for s in samples:
        lines += [
            f"### {s['id']} (role: {s['role']})",
            "",
            f"**Question.** {s['question']}",
            "",
            f"**Gold answer.** {s['gold']}",
            "",
            f"**Model answer.** {s['generated'] or '(empty)'}",
            "",
            "**Citations.** "
            + (
                "; ".join(
                    f"[{i}] {c['title']} ({c['source']}, {c['url']})" for i, c in enumerate(s.get("citations") or [], 1)
                )
                or "none"
            ),
            "",
            f"Perplexity {s['perplexity']:.2f}; quality gate: "
            + (
                "**degenerate** (" + ", ".join(s["reasons"]) + "), withheld by the service"
                if s["degenerate"]
                else "passed"
            ),
            "",
        ]
    lines += [
        "## Reproduce",
        "",
        "```",
        f"python -m training run --recipe training/recipes/{recipe.name}.yaml --out <folder>",
        "```",
        "",
        f"Recipe fingerprint `{recipe.fingerprint()}`; environment: {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}.",
    ]
    return "\n".join(lines) + "\n"
