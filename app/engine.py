"""One loaded checkpoint and the three things the service asks of it:
batched generation, batched scoring and prompt log-probabilities.

The decode loop is our own rather than ``model.generate`` because a dynamic
batch mixes requests with different sampling settings, lengths, seeds and
stop times: each row samples with its own settings and generator, finished or
cancelled rows leave the KV cache at once, and every token is reported as it
is made (streaming) with its log-probability under the raw model (the
perplexity a clinician sees).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.manifest import read_manifest, verify_checkpoint
from app.prompting import render_prompt
from app.scoring import Score, chosen_logprobs, score_from_logprobs, score_texts

log = logging.getLogger("medask.engine")


class CheckpointError(RuntimeError):
    """The checkpoint cannot be served; the message says exactly why."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # called with each new piece of text
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    first_token_at: float | None

    @property
    def score(self) -> Score:
        return score_from_logprobs(self.logprobs, self.text)


@dataclass
class PromptLogprobs:
    tokens: list[str]
    token_ids: list[int]
    offsets: list[int]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]


def pick_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("MEDASK_DEVICE=cuda but no CUDA device is visible")
    return wanted


class Engine:
    """A checkpoint loaded once; all methods run on the scheduler's worker thread."""

    def __init__(
        self, model: Any, tokenizer: Any, folder: Path, manifest: dict[str, Any], device: str, load_seconds: float
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.folder = folder
        self.manifest = manifest
        self.device = device
        self.load_seconds = load_seconds
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        config = model.config
        self.context_length: int = int(getattr(config, "max_position_embeddings", 2048))
        qcfg = getattr(config, "quantization_config", None)
        qdict = qcfg if isinstance(qcfg, dict) else (qcfg.to_dict() if qcfg is not None else {})
        self.quantization: dict[str, Any] = {
            k: qdict.get(k) for k in ("quant_method", "bits", "group_size", "sym", "desc_act") if k in qdict
        }
        self.kernel = _kernel_name(model)

    # ---- loading -------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, device: str = "auto", dtype: str = "auto", threads: int | None = None) -> Engine:
        """Verify the checkpoint against its manifest, then load it once."""
        t0 = time.perf_counter()
        folder = Path(folder)
        problems = verify_checkpoint(folder)
        if problems:
            raise CheckpointError(f"checkpoint {folder} is not servable: " + "; ".join(problems))
        manifest = read_manifest(folder)
        config = _read_json(folder / "config.json")
        qcfg = config.get("quantization_config")
        if qcfg and qcfg.get("quant_method") != "gptq":
            raise CheckpointError(
                f"checkpoint {folder} uses quantization {qcfg.get('quant_method')!r}; this service serves GPTQ or unquantized checkpoints"
            )
        if threads:
            torch.set_num_threads(threads)
        dev = pick_device(device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # a broken tokenizer is a checkpoint fault, said plainly
            raise CheckpointError(f"tokenizer in {folder} cannot be loaded: {exc}") from exc
        if not tokenizer.chat_template:
            raise CheckpointError(f"tokenizer in {folder} has no chat template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        kwargs: dict[str, Any] = {"dtype": dtype if dtype != "auto" else "auto"}
        if dev == "cuda":
            kwargs["device_map"] = "cuda"
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except Exception as exc:
            raise CheckpointError(f"model in {folder} cannot be loaded: {exc}") from exc
        if dev == "cpu" and not qcfg:
            model = model.to("cpu")
        model.eval()
        return cls(model, tokenizer, folder, manifest, dev, time.perf_counter() - t0)

    # ---- prompts -------------------------------------------------------
    def encode_question(self, question: str, role: str) -> list[int]:
        return self.encode(render_prompt(self.tokenizer, question, role))

    def encode(self, text: str) -> list[int]:
        # special tokens come from the chat template (see app.prompting)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- generation ----------------------------------------------------
    @torch.inference_mode()
    def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        """Decode a batch together; each row has its own settings and stop time."""
        n = len(jobs)
        dev = self.model.device
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: every row's last token is at -1
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        gens = [_generator(j.params.seed) for j in jobs]
        out_ids: list[list[int]] = [[] for _ in jobs]
        out_lp: list[list[float]] = [[] for _ in jobs]
        texts = [""] * n
        finish: list[str | None] = [None] * n
        first_at: list[float | None] = [None] * n
        active = list(range(n))  # row r of the live batch is job active[r]

        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        while True:
            next_tokens = []
            for r, j in enumerate(active):
                job = jobs[j]
                token = _sample(logits[r], job.params, gens[j])
                next_tokens.append(token)
                if first_at[j] is None:
                    first_at[j] = time.perf_counter()
                if token == self.eos_id:
                    finish[j] = "stop"
                    continue
                out_ids[j].append(token)
                out_lp[j].append(
                    float(chosen_logprobs(logits[r : r + 1], torch.tensor([token], device=logits.device))[0])
                )
                if job.on_text is not None:  # detokenize per step only when someone is listening
                    new_text = self.tokenizer.decode(out_ids[j], skip_special_tokens=True)
                    if not new_text.endswith("\ufffd") and len(new_text) > len(texts[j]):
                        job.on_text(new_text[len(texts[j]) :])
                        texts[j] = new_text
                if len(out_ids[j]) >= job.params.max_new_tokens:
                    finish[j] = "length"
                elif job.cancelled.is_set():
                    finish[j] = "cancelled"
            keep = [r for r, j in enumerate(active) if finish[j] is None]
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask = mask[idx]
                next_tokens = [next_tokens[r] for r in keep]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=dev)], dim=1)
            step_ids = torch.tensor(next_tokens, device=dev).unsqueeze(1)
            positions = mask.sum(-1, keepdim=True) - 1
            out = self.model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]

        results = []
        for j, job in enumerate(jobs):
            text = self.tokenizer.decode(out_ids[j], skip_special_tokens=True)
            if job.on_text is not None and len(text) > len(texts[j]):
                job.on_text(text[len(texts[j]) :])  # flush a trailing partial character
            results.append(
                GenerationResult(text, out_ids[j], out_lp[j], finish[j] or "length", len(job.prompt_ids), first_at[j])
            )
        return results

    # ---- scoring -------------------------------------------------------
    def score(self, items: Sequence[tuple[str | None, str]], batch_size: int = 16) -> list[Score]:
        """log p(target | context) per item: the same math as the evaluation report."""
        return score_texts(self.model, self.tokenizer, items, batch_size)

    @torch.inference_mode()
    def prompt_logprobs(self, text: str, top_k: int) -> PromptLogprobs:
        """Per-token log-probabilities of a raw prompt (OpenAI echo + logprobs)."""
        ids = self.encode(text)
        dev = self.model.device
        tokens = [self.tokenizer.decode([t]) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        if not ids:
            return PromptLogprobs([], [], [], [], [])
        logits = self.model(input_ids=torch.tensor([ids], device=dev)).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        lps: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        for i in range(1, len(ids)):
            lps.append(float(logp[i - 1, ids[i]]))
            if top_k > 0:
                vals, idx = logp[i - 1].topk(top_k)
                tops.append({self.tokenizer.decode([int(k)]): float(v) for v, k in zip(vals, idx, strict=True)})
            else:
                tops.append(None)
        return PromptLogprobs(tokens, ids, offsets, lps, tops)

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.get("name"),
            "base_model": m.get("base_model"),
            "architecture": m.get("architecture"),
            "parameters": m.get("parameters"),
            "quantization": self.quantization or {"quant_method": None},
            "kernel": self.kernel,
            "device": self.device,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "context_length": self.context_length,
            "heldout_metrics": m.get("metrics"),
            "created": m.get("created"),
            "git_commit": m.get("git_commit"),
            "libraries": m.get("libraries"),
            "load_seconds": round(self.load_seconds, 3),
        }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return gen


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        cut = cum - sorted_p > params.top_p  # keep the smallest set reaching top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _kernel_name(model: Any) -> str:
    """Which linear kernel serves the weights: tells ops whether 4-bit stayed 4-bit."""
    for module in model.modules():
        if hasattr(module, "qweight"):
            return type(module).__name__
    return "torch.nn.Linear"
