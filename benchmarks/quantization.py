"""The DPO model before GPTQ (fp16) against the published GPTQ 4-bit checkpoint:
disk size, peak RSS after load, single-stream decode speed, held-out bits per byte.

    python benchmarks/quantization.py [--fp16 runs/default/dpo] [--gptq model_artifacts/default]
                                      [--tokens 128] [--repeats 5] [--rows 141]

``--fp16`` is the DPO stage folder of a default build (``make model`` leaves it
in ``runs/default/dpo``); it is loaded as fp16, as the paper serves it. Each
model is measured in a fresh process, so peak RSS is that model's alone. Decode
runs through the service's own engine (greedy, held-out questions); bits per
byte uses the evaluation's scoring on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WEIGHTS = (".safetensors", ".bin")


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(WEIGHTS))


def measure(folder: Path, kind: str, tokens: int, repeats: int, rows: int) -> dict:
    """Runs in the child process: load, then time decode and score the held-out split."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.clinical.scoring import combine
    from app.engine.local import Engine
    from benchmarks.common import decode_rates, heldout_prompts
    from training.data import heldout_rows
    from training.evaluate import score_answers

    torch.set_num_threads(os.cpu_count() or 1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).eval()
    load_s = time.perf_counter() - t0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    on_disk = folder
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "fp16":  # the DPO stage is stored in fp32: size it as the fp16 model it is served as
            model.save_pretrained(tmp)
            on_disk = Path(tmp)
        size = disk_bytes(on_disk)
    engine = Engine(model, tokenizer, folder, {}, "cpu", load_s)
    held = heldout_rows()
    rates = decode_rates(engine, heldout_prompts(engine, repeats), tokens, repeats=repeats)
    sample = held[:rows]
    total = combine(score_answers(model, tokenizer, sample))
    return {
        "model": kind,
        "folder": str(folder),
        "kernel": engine.kernel,
        "weights_mb": size / 1e6,
        "peak_rss_mb": peak_rss_mb,
        "rss_before_load_mb": rss_before / 1024,
        "load_s": load_s,
        "tok_s_median": statistics.median(rates),
        "heldout_rows": len(sample),
        "bits_per_byte": total.bits_per_byte,
        "perplexity": total.perplexity,
    }


def main() -> None:
    from benchmarks.common import report

    p = argparse.ArgumentParser()
    p.add_argument("--fp16", default="runs/default/dpo")
    p.add_argument("--gptq", default="model_artifacts/default")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, default=141)
    p.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, folder = args.child
        print("RESULT " + json.dumps(measure(Path(folder), kind, args.tokens, args.repeats, args.rows)))
        return
    if not Path(args.fp16, "config.json").is_file():
        raise SystemExit(
            f"{args.fp16} holds no model: build the DPO stage first (make model, or "
            "python -m training run --recipe training/recipes/default.yaml --out out/default --until dpo)"
        )
    rows = []
    for kind, folder in (("fp16", args.fp16), ("gptq-4bit", args.gptq)):
        cmd = [sys.executable, __file__, "--child", kind, folder, "--tokens", str(args.tokens)]
        cmd += ["--repeats", str(args.repeats), "--rows", str(args.rows)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT ") :]))
    fp16, gptq = rows
    ratios = [
        {
            "gptq / fp16": "ratio",
            "weights_mb": gptq["weights_mb"] / fp16["weights_mb"],
            "peak_rss_mb": gptq["peak_rss_mb"] / fp16["peak_rss_mb"],
            "tok_s_median": gptq["tok_s_median"] / fp16["tok_s_median"],
            "bits_per_byte": gptq["bits_per_byte"] / fp16["bits_per_byte"],
        }
    ]
    report("quantization: DPO fp16 vs GPTQ 4-bit", rows, {"ratios": ratios})
    report("ratios: GPTQ / fp16", ratios)


if __name__ == "__main__":
    main()
