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

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from app.clinical.scoring import Score, score_texts
from app.engine import native
from app.engine.base import (
    CheckpointError,
    EngineBase,
    GenerationJob,
    GenerationResult,
    PromptLogprobs,
    ScoreItem,
    open_checkpoint,
    text_offsets,
)
from app.engine.batch import DecodeBatch, StaticDecodeBatch
from app.engine.decode import MAX_STATIC_CACHE_BYTES, StaticDecoder, cache_bytes, cpu_flags, supports
from app.engine.layers import SMALL_ROWS
from app.engine.sampling import Row, Sampler

log = logging.getLogger("medask.engine")


def resolve_dtype(wanted: str, device: str) -> str:
    """Activation dtype. ``auto``: the checkpoint's own (fp16 for GPTQ, the paper's setting) on a GPU;
    float32 on a CPU, where fp16 arithmetic is emulated: 1.57x the tokens/s at batch 16 here
    (benchmarks/batch_ceiling.py --dtype). 4-bit GPTQ weights stay 4-bit either way."""
    if wanted != "auto":
        return wanted
    return "float32" if device == "cpu" else "auto"


def pick_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("MEDASK_DEVICE=cuda but no CUDA device is visible")
    return wanted


class Engine(EngineBase):
    """A checkpoint's weights loaded once, in this process; the model belongs to the worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        folder: Path,
        manifest: dict[str, Any],
        device: str,
        load_seconds: float,
        front: Any = None,
    ):
        config = model.config
        qcfg = getattr(config, "quantization_config", None)
        facts = {
            "max_position_embeddings": getattr(config, "max_position_embeddings", 2048),
            "vocab_size": getattr(config, "vocab_size", 0),
            "quantization_config": qcfg if isinstance(qcfg, dict) else (qcfg.to_dict() if qcfg is not None else {}),
        }
        super().__init__(tokenizer, folder, manifest, facts, load_seconds, front)
        self.model = model
        self.sampler = Sampler(self.tokenizer, self.eos_id)  # per-row sampling and records, for both batch kinds
        self.device = device
        self.kernel = _kernel_name(model)
        # the static decode step (app.engine.decode), set up by ``use_static_decoder``; None: the model's forward
        self.decoder: StaticDecoder | None = None
        self.integer_dot: str | None = None
        self.prefill_chunk: int | None = None  # prompt tokens run per decode step while rows decode (None: whole)
        self.decode_note = "the model's own forward (static decode step not set up)"
        # rows can join a running batch only when every layer's KV cache simply grows
        types = getattr(config, "layer_types", None) or ["full_attention"]
        self.continuous_batching: bool = getattr(config, "sliding_window", None) is None and all(
            t == "full_attention" for t in types
        )

    def use_static_decoder(
        self,
        max_rows: int,
        compile: bool = False,
        lm_head: str = "float32",
        decode_weights: str = "int4",
        prompt_weights: str = "bfloat16",
        dense_bytes: int = 1 << 30,
        prefix_bytes: int = 0,
        prefill_chunk: int | None = None,
        int8_probe: Sequence[str] = (),
        kv_cache: str = "float32",
        integer_dot: str = "auto",
    ) -> float:
        """Decode with app.engine.decode's static KV cache and fused step (compiled if asked), when this
        model allows it; returns the seconds spent setting up (and compiling)."""
        reason = supports(self.model)
        if reason is None and (need := cache_bytes(self.model.config, max_rows)) > MAX_STATIC_CACHE_BYTES:
            reason = (
                f"a static KV cache for {max_rows} rows of the full context needs {need / 2**30:.1f} GiB "
                f"(more than {MAX_STATIC_CACHE_BYTES / 2**30:.0f}); lower MEDASK_MAX_BATCH_SIZE to use it"
            )
        if reason is None and self.device != "cpu":
            reason = f"device {self.device} (the fused step uses GPTQ's CPU kernel; CUDA graphs are future work)"
        if reason is not None:
            self.decode_note = f"the model's own forward: {reason}"
            return 0.0
        # before the decoder times its kernels: they are timed with the instructions they will run
        self.integer_dot = native.integer_dot(integer_dot)
        self.decoder = StaticDecoder(
            self.model,
            max_rows,
            compile=compile,
            lm_head=lm_head,
            dense_bytes=dense_bytes,
            decode_weights=decode_weights,
            prompt_weights=prompt_weights,
            prefix_bytes=prefix_bytes,
            int8_probe=[self.encode(text) for text in int8_probe],
            kv_cache=kv_cache,
        )
        self.prefill_chunk = prefill_chunk
        self.decode_note = "static KV cache, fused step" + (" (torch.compile)" if compile else " (eager)")
        try:
            return self.decoder.warm_up()
        except Exception as exc:  # no C++ compiler, an unsupported op: the eager step computes the same
            if not compile:
                raise
            log.warning("torch.compile failed; decoding with the eager static step", exc_info=True)
            self.decoder.use_eager()
            self.decode_note = f"static KV cache, fused step (eager: torch.compile failed: {type(exc).__name__})"
            return self.decoder.warm_up()

    # ---- loading -------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, device: str = "auto", dtype: str = "auto", threads: int | None = None) -> Engine:
        """Verify the checkpoint against its manifest, then load it once."""
        t0 = time.perf_counter()
        folder = Path(folder)
        tokenizer, front, manifest, config = open_checkpoint(folder)
        if threads:
            torch.set_num_threads(threads)
        dev = pick_device(device)
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev)}
        if dev == "cuda":
            kwargs["device_map"] = "cuda"
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except Exception as exc:
            raise CheckpointError(f"model in {folder} cannot be loaded: {exc}") from exc
        if dev == "cpu" and not config.get("quantization_config"):
            model = model.to("cpu")
        model.eval()
        return cls(model, tokenizer, folder, manifest, dev, time.perf_counter() - t0, front)

    # ---- generation ----------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        jobs: Sequence[GenerationJob],
        admit: Callable[[int], Sequence[GenerationJob]] | None = None,
        on_finish: Callable[[GenerationJob, GenerationResult], None] | None = None,
        max_rows: int | None = None,
        on_error: Callable[[GenerationJob, BaseException], None] | None = None,
    ) -> list[GenerationResult]:
        """Decode a batch together; each row has its own settings and stop time.

        Continuous batching: after every decode step ``admit(room)`` may hand over
        new jobs (at most ``room``, keeping at most ``max_rows`` rows); they are
        prefilled and join the running batch, so a request never waits for a
        whole batch to finish. ``on_finish`` hears of each row the moment it
        ends. Returns the results of ``jobs`` (admitted jobs only reach
        ``on_finish``). A failure fails the whole batch (it raises; ``on_error`` is for engines
        whose rows fail one by one).
        """
        if admit is not None and not self.continuous_batching:
            admit = None
        limit = max_rows or len(jobs)
        results: dict[int, GenerationResult] = {}

        def finish(rows: list[Row]) -> None:
            for row in rows:
                result = self.sampler.result(row)
                results[id(row.job)] = result
                if on_finish is not None:
                    on_finish(row.job, result)

        batch: DecodeBatch | StaticDecodeBatch
        if self.decoder is not None and max(limit, len(jobs)) <= self.decoder.max_rows:
            batch = StaticDecodeBatch(self.decoder, self.sampler, self.prefill_chunk)
        else:  # no static decoder, or more rows than it has slots: the model's own forward
            batch = DecodeBatch(self.model, self.pad_id, self.sampler)
        finish(batch.admit(jobs))
        while batch:
            batch.step()
            finish(batch.drop_finished())
            if admit is not None:  # every step, full or not: the scheduler also drops expired work here
                finish(batch.admit(admit(limit - len(batch))))
        return [results[id(job)] for job in jobs]

    # ---- scoring -------------------------------------------------------
    def score(
        self, items: Sequence[ScoreItem], batch_size: int = 16, cancelled: Callable[[], bool] | None = None
    ) -> list[Score | BaseException]:
        """log p(target | context) per item: the same math as the evaluation report."""
        pairs = [(context, target) for context, target, _ in items]
        return score_texts(self.model, self.tokenizer, pairs, batch_size, [enc for _, _, enc in items])

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], top_k: int) -> PromptLogprobs:
        """Per-token log-probabilities of a prompt's tokens (OpenAI echo + logprobs)."""
        dev = self.model.device
        tokens = [self.tokenizer.decode([t]) for t in ids]
        offsets = text_offsets(tokens)
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
        out = super().info()
        out["dtype"] = str(next(self.model.parameters()).dtype).replace("torch.", "")
        d = self.decoder
        out["decode"] = {
            "path": "static" if d is not None else "model",
            "note": self.decode_note,
            "compiled": bool(d and d.compiled),
            "lm_head": {f"1-{SMALL_ROWS} rows": d.head.kernel, "more rows": d.head.large} if d is not None else None,
            # chosen by timing on this CPU when MEDASK_LM_HEAD_DTYPE=auto (ms per 1-row and full-batch matmul)
            "lm_head_timing_ms": d.head_timing if d is not None else None,
            "cpu_flags": list(cpu_flags()),
            # the 8-bit kernels' byte products: vnni or avx2 (the same outputs; None: no MedAsk kernels here)
            "integer_dot": self.integer_dot if d is not None else None,
            "slots": d.max_rows if d is not None else None,
            "kv_cache_mb": round(sum(t.nbytes for t in d.keys + d.values) / 2**20, 1) if d is not None else None,
            # float32 (torch's attention) or float16 (MedAsk's decode attention): checked on the probe text like
            # int8 and timed on this CPU at start unless forced (app.engine.kv)
            "kv_cache": {"dtype": d.kv_cache, "check": d.kv_check, "timing_ms": d.kv_timing, "note": d.kv_note}
            if d is not None
            else None,
            # which weights serve a decode step and a prompt (int4: GPTQ's kernel; bfloat16/float32: a dense
            # copy read back through it), timed on this CPU at start unless forced; their bytes
            "decode_weights": {f"1-{SMALL_ROWS} rows": d.decode_small, "more rows": d.decode_large}
            if d is not None
            else None,
            "prompt_weights": d.prompt_weights if d is not None else None,
            "weight_timing_ms": d.weight_timing if d is not None else None,
            "dense_weights_mb": round(d.dense_bytes / 2**20, 1) if d is not None else None,
            # prompts' keys and values kept for later prompts sharing a prefix (app.engine.prefix)
            "prefix_cache": d.prefix.info() if d is not None and d.prefix is not None else None,
            "prefill_chunk_tokens": self.prefill_chunk if d is not None else None,
            # int8 (8-bit activations) is an automatic choice only within +0.5% of the 4-bit kernel's
            # negative log-likelihood of the evidence pack's first passages, measured at start
            "int8_check": d.int8_check if d is not None else None,
        }
        return out


def _kernel_name(model: Any) -> str:
    """Which linear kernel serves the weights: tells ops whether 4-bit stayed 4-bit."""
    for module in model.modules():
        if hasattr(module, "qweight"):
            return type(module).__name__
    return "torch.nn.Linear"
