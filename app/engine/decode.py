"""A decode step of our own for Llama checkpoints: a static KV cache, fused 4-bit projections, and
one function that torch.compile can turn into one graph.

Why not the model's forward: a decode step of a small model on a CPU is dominated by the work
around the arithmetic. transformers builds masks, grows the KV cache by concatenation and checks
its arguments on every call (more than 1,500 operator calls per step here), and each GPTQ layer
casts its input to bfloat16 and back and reorders it with an index that is the identity when
``desc_act`` is off. Here:

- **Static KV cache**: one preallocated tensor per layer, ``(rows, kv_heads, context, head_dim)``.
  A row is a slot; the running rows are always slots ``0..n-1`` (a row that ends is replaced by the
  last one), so a step reads a view, never a copy, and a new token is written in place.
- **Fused projections**: q/k/v are one int4 matmul, gate/up another (GPTQ's CPU kernel packs
  weights by output row, so stacking the packed weights stacks the outputs); the identity reorder
  is skipped.
- **Compiled**: ``step`` is plain tensor code; with ``compile=True`` it runs through
  ``torch.compile`` with the row count and the attended length as dynamic sizes, so continuous
  batching never recompiles. Eager ``step`` is the reference it is tested against.

A prompt is run row by row straight into its slot (no padding to the longest prompt).

**Every dtype and kernel is chosen on the machine it runs on**, never assumed: which kernel serves
a decode step and a prompt (GPTQ's 4-bit kernel, MedAsk's C++ kernels over its 4-bit weights, or a
copy of its weights read back through it: float32, bfloat16, float16, int8, see ``app.engine.kernels``;
copies within ``dense_bytes``) and the LM head's (one for 1-4 rows, one for more) are timed at start
on this CPU (``choose_paths``, ``choose_head``: milliseconds) and the fastest kept. bfloat16 reads half the bytes of float32 but
is several times slower on CPUs without native bf16 (AVX2-only); settings force any kernel.
The KV cache is float32 (torch's attention) or float16 (MedAsk's C++ decode attention: half the
bytes a step reads), chosen the same way (``app.engine.kv``). Layers that are not GPTQ's CPU kernel with an identity input order (an unquantized checkpoint,
``desc_act``) run as themselves inside the step. Checkpoints it does not cover (other
architectures, biases, sliding windows, unusual RoPE) keep the model's forward: ``supports`` says why.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from app.clinical.scoring import chosen_logprobs
from app.engine import kernels, kv
from app.engine.compiled import compile_step
from app.engine.layers import SMALL_ROWS, Head, Projection, choose_head, choose_paths
from app.engine.prefix import PrefixCache
from app.engine.retime import retime

# attended lengths are rounded up to a multiple of this: fewer distinct shapes, little waste
LENGTH_STEP = 64


# kernels of 8-bit activations (and a float16 KV cache) may be chosen automatically only within this change
# of bits/byte (issue 28)
INT8_MAX_CHANGE_PCT = 0.5

# a static cache larger than this is not allocated: the model's forward grows its cache as rows need it
MAX_STATIC_CACHE_BYTES = 8 << 30


def cache_bytes(config: Any, rows: int) -> int:
    """Bytes of a float32 static KV cache for ``rows`` slots of the full context."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * int(config.num_hidden_layers) * rows * kv_heads * int(config.max_position_embeddings) * head_dim * 4


def supports(model: Any) -> str | None:
    """Why this model cannot use the static decode step (None: it can)."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} (the static decode step covers llama)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biased projections"
    if getattr(config, "sliding_window", None):
        return "a sliding window"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3", "dynamic"):
        return f"rope type {rope.get('rope_type')!r}"
    return None


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The instruction sets that decide which kernels are fast here (benchmarks record them too)."""
    from app.engine.native import reported_flags

    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    return tuple(f for f in wanted if f in reported_flags())


class StaticDecoder:
    """The static KV cache and the decode step for one loaded Llama model."""

    def __init__(
        self,
        model: Any,
        max_rows: int,
        compile: bool = False,
        lm_head: str = "float32",
        dense_bytes: int = 1 << 30,
        decode_weights: str = "int4",
        prompt_weights: str = "bfloat16",
        prefix_bytes: int = 0,
        int8_probe: Sequence[Sequence[int]] = (),
        kv_cache: str = "float32",
    ) -> None:
        config = model.config
        inner = model.model
        self.max_rows = max_rows
        self.context = int(config.max_position_embeddings)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.gqa = self.kv_heads != self.heads  # a plain bool, decided once (compiled code needs it constant)
        device = next(model.parameters()).device
        self.device = device
        self._warm_kernels(model)
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        head = model.lm_head.weight
        self.head_timing: dict[str, dict[str, float]] = {}
        if lm_head != "auto" and (
            lm_head not in kernels.KERNELS or lm_head in kernels.FOUR_BIT or kernels.available(lm_head)
        ):
            why = kernels.available(lm_head) if lm_head not in kernels.FOUR_BIT else "the LM head is not 4-bit"
            raise kernels.KernelError(f"LM head kernel {lm_head!r} cannot run here: {why}")
        self.head = Head(head, "float32" if lm_head == "auto" else lm_head)  # auto: timed below
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
                    Projection([attn.o_proj]),
                    layer.post_attention_layernorm.weight,
                    Projection([mlp.gate_proj, mlp.up_proj]),
                    Projection([mlp.down_proj]),
                )
            )
        projections = [proj for layer in self.layers for proj in layer[1:3] + layer[4:6]]
        for path in (decode_weights, prompt_weights):
            if path not in (*kernels.KERNELS, "auto"):
                raise kernels.KernelError(f"unknown kernel {path!r} (one of auto, {', '.join(kernels.KERNELS)})")
            if path != "auto" and (why := kernels.available(path)):
                raise kernels.KernelError(f"kernel {path!r} cannot run here: {why}")
            need = sum(p.bytes(path) for p in projections) if path != "auto" else 0
            if need > dense_bytes:
                raise kernels.KernelError(
                    f"dense {path} weights need {need / 2**20:.0f} MiB, more than the {dense_bytes / 2**20:.0f} MiB "
                    "allowed for dense copies: choose int4 or auto"
                )
        positions = torch.arange(self.context, device=device)[None]
        probe = torch.zeros(1, device=device, dtype=torch.float32)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].float(), sin[0].float()  # (context, head_dim)
        half_why = kv.refuse(kv_cache, self.head_dim)  # a KernelError for a cache that cannot run here
        self._allocate(1, "float32")  # one slot for the checks and timings at start; all of them at the end
        # 8-bit activations change the arithmetic: a candidate only when it scores this checkpoint's probe text as well
        self.int8_check: dict[str, Any] | None = None
        eight_bit = [k for k in kernels.EIGHT_BIT if kernels.available(k) is None]
        if int8_probe and "auto" in (lm_head, decode_weights, prompt_weights) and eight_bit:
            self.int8_check = self._check_int8(projections, head, int8_probe, eight_bit)
        candidates = kernels.AUTO_KERNELS + tuple(self.int8_check["admitted"] if self.int8_check else ())
        chosen, self.weight_timing = choose_paths(
            projections, max_rows, dense_bytes, decode_weights, prompt_weights, candidates
        )
        self.decode_small, self.decode_large, self.prompt_weights = chosen["small"], chosen["large"], chosen["prompt"]
        if lm_head == "auto":
            small, large, self.head_timing = choose_head(
                head, max_rows, [k for k in candidates if k not in kernels.FOUR_BIT]
            )
            self.head = Head(head, small, large)
        self._use(projections)
        self.kv_check: dict[str, Any] | None = None
        self.kv_timing: dict[str, dict[str, float]] = {}
        self.kv_note = half_why or ""
        if kv_cache == "auto":
            kv_cache = self._choose_kv(int8_probe, half_why)
        self._allocate(max_rows, kv_cache)
        # whole one-row steps and prefills, timed with the cache as served (app.engine.retime); use() frees the rest
        if decode_weights == "auto":
            self.decode_small = retime(self, projections, "small")
            self._use(projections)
        if prompt_weights == "auto":
            self.prompt_weights = retime(self, projections, "prompt")
            self._use(projections)
        self.dense_bytes = sum(p.bytes(k) for p in projections for k in p.packed)
        # kept prompt prefixes (0 bytes: none kept)
        self.prefix = PrefixCache(prefix_bytes) if prefix_bytes > 0 else None
        self.compiled = False
        self._step: Callable[..., torch.Tensor] = self.step
        if compile:
            self._step = compile_step(self.step)  # guards on its arguments only (app.engine.compiled)
            self.compiled = True

    def _use(self, projections: Sequence[Projection]) -> None:
        """Every projection on the chosen kernels; copies no path uses are freed (``Projection.use``)."""
        for proj in projections:
            proj.use(self.decode_small, self.decode_large, self.prompt_weights)

    def _allocate(self, rows: int, dtype: str) -> None:
        self.kv_cache, self.kv_half = dtype, dtype == "float16"
        shape = (rows, self.kv_heads, self.context, self.head_dim)
        self.keys, self.values = [], []  # the old cache is freed before the new one is made
        self.keys, self.values = (
            [torch.zeros(shape, dtype=kv.DTYPES[dtype], device=self.device) for _ in self.layers] for _ in "kv"
        )

    @torch.inference_mode()
    def _choose_kv(self, probe: Sequence[Sequence[int]], half_why: str | None) -> str:
        """float16 when it can run here, scores the probe text within INT8_MAX_CHANGE_PCT (no probe: not
        admitted, as for 8-bit activations) and its attention is timed faster than float32's."""
        if half_why or not probe:
            self.kv_note = half_why or "not checked (no probe text): float32"
            return "float32"
        texts = [list(ids)[: self.context] for ids in probe]
        self.kv_check = kv.check(lambda dtype: self._allocate(1, dtype) or self._nll(texts), INT8_MAX_CHANGE_PCT)
        if not self.kv_check["admitted"]:
            return "float32"
        rows = min(self.max_rows, kv.TIMED_ROWS)
        self.kv_timing = kv.time_caches(len(self.layers), rows, self.heads, self.kv_heads, self.head_dim)
        return kv.fastest(self.kv_timing, rows)

    def _nll(self, texts: Sequence[Sequence[int]]) -> float:
        """Negative log-likelihood of the token ids ``texts`` through the prompt path (slot 0)."""
        return -sum(
            float(chosen_logprobs(self.extend(0, ids, 0, every=True)[:-1], torch.tensor(ids[1:])).sum())
            for ids in texts
        )

    @torch.inference_mode()
    def _check_int8(
        self,
        projections: Sequence[Projection],
        head: torch.Tensor,
        probe: Sequence[Sequence[int]],
        eight_bit: list[str],
    ) -> dict[str, Any]:
        """Negative log-likelihood of ``probe`` (token ids of text beside the checkpoint: the evidence
        pack's first passages) through the 4-bit kernel and a float32 head, then through each kernel of
        8-bit activations (``eight_bit``): one may be chosen by auto only if it costs at most
        INT8_MAX_CHANGE_PCT (issue 28's bound on held-out bits/byte; equal bytes, so the NLL ratio is the
        bits/byte ratio). An 8-bit weight kernel is checked as the LM head too; a 4-bit one with the first
        8-bit head admitted (the two may be chosen together), else the float32 head. About half a second
        a kernel."""
        texts = [list(ids)[: self.context] for ids in probe]
        nll: dict[str, float] = {}
        checked: dict[str, dict[str, Any]] = {}
        for kernel in ["int4", *eight_bit]:  # EIGHT_BIT lists the 4-bit kernels last
            head_kernel = "float32" if kernel == "int4" else kernel
            if kernel in kernels.FOUR_BIT and kernel != "int4":  # with an 8-bit head admitted before it, if any
                head_kernel = next((k for k, v in checked.items() if v["admitted"]), "float32")
            self.head = Head(head, head_kernel)
            for proj in projections:
                proj.use(kernel, kernel, kernel)
            nll[kernel] = self._nll(texts)
            if kernel != "int4":
                change = 100 * (nll[kernel] / nll["int4"] - 1)
                checked[kernel] = {
                    "lm_head": head_kernel,
                    "change_pct": round(change, 4),
                    "admitted": change <= INT8_MAX_CHANGE_PCT,
                }
        for proj in projections:
            proj.use("int4", "int4", "int4")
        tokens = sum(len(ids) - 1 for ids in texts)
        return {
            "probe_tokens": tokens,
            "kernels": checked,
            "admitted": [k for k, v in checked.items() if v["admitted"]],
        }

    def _probe_step(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Arguments of a one-row step at a typical answer's length (slot 0; its cache is scratch at start)."""
        return torch.tensor([0]), torch.tensor([LENGTH_STEP * 4]), 1, LENGTH_STEP * 5

    def use_eager(self) -> None:
        """Run the step uncompiled (compilation failed): same cache, same weights, same numbers."""
        self._step, self.compiled = self.step, False

    @staticmethod
    def _warm_kernels(model: Any) -> None:
        """GPTQ's CPU layers pack their weights on the first call: make that call now."""
        for module in model.modules():
            if hasattr(module, "transform") and getattr(module, "linear_mode", "x") is None:
                with torch.inference_mode():
                    module(torch.zeros(1, module.in_features, dtype=torch.float32))

    # ---- rows ------------------------------------------------------------------------
    @torch.inference_mode()
    def reuse(self, slot: int, ids: Sequence[int]) -> int:
        """Copy the longest kept prefix of ``ids`` (app.engine.prefix) into ``slot``; returns its length
        (0: none kept, or no prefix cache)."""
        if self.prefix is None:
            return 0
        n, layers = self.prefix.find(ids)
        if layers is None:
            return 0
        for i, (k, v) in enumerate(layers):
            self.keys[i][slot, :, :n] = k[:, :n]
            self.values[i][slot, :, :n] = v[:, :n]
        return n

    @torch.inference_mode()
    def remember(self, slot: int, ids: Sequence[int]) -> None:
        """Keep the keys and values of the prompt ``ids`` now in ``slot`` for later prompts sharing a prefix."""
        if self.prefix is not None:
            n = len(ids)
            layers = [
                (k[slot, :, :n].clone(), v[slot, :, :n].clone()) for k, v in zip(self.keys, self.values, strict=True)
            ]
            self.prefix.keep(ids, layers)

    @torch.inference_mode()
    def extend(self, slot: int, ids: Sequence[int], start: int, every: bool = False) -> torch.Tensor:
        """Run prompt tokens ``ids`` into ``slot`` at positions ``start...`` (the slot's first ``start``
        positions already hold this prompt's keys and values: a kept prefix, or earlier chunks). Keys and
        values are written in place, no padding, no copy. Returns the logits of the last token (1, vocab),
        or of every token (``every``: scoring through the step's own kernels)."""
        n = len(ids)
        end = start + n
        x = self.embed[torch.tensor(ids, device=self.device)].float()
        cos, sin = self.cos[start:end][:, None, :], self.sin[start:end][:, None, :]
        # query t (position start + t) sees keys 0..start + t; a fresh prompt is plain causal attention
        mask = None
        if start:
            mask = (
                torch.arange(end, device=self.device)[None, :] <= torch.arange(start, end, device=self.device)[:, None]
            )
        for i, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            q, k, v = qkv.wide(_rms_norm(x, ln1, self.eps))
            q = _rope(q.view(n, self.heads, self.head_dim), cos, sin).transpose(0, 1)
            k = _rope(k.view(n, self.kv_heads, self.head_dim), cos, sin).transpose(0, 1)
            self.keys[i][slot, :, start:end] = k.to(self.keys[i].dtype)
            self.values[i][slot, :, start:end] = (
                v.view(n, self.kv_heads, self.head_dim).transpose(0, 1).to(self.keys[i].dtype)
            )
            out = torch.nn.functional.scaled_dot_product_attention(
                q[None],
                self.keys[i][slot : slot + 1, :, :end].float(),  # a float16 cache read back (what decode reads)
                self.values[i][slot : slot + 1, :, :end].float(),
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=self.gqa,
            )[0]
            x = x + o_proj.wide(out.transpose(0, 1).reshape(n, self.heads * self.head_dim))[0]
            g, u = gate_up.wide(_rms_norm(x, ln2, self.eps))
            x = x + down.wide(torch.nn.functional.silu(g) * u)[0]
        return self.head(_rms_norm(x if every else x[-1:], self.norm, self.eps))

    @torch.inference_mode()
    def swap_rows(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Slots ``a`` and ``b`` trade their rows (a prompt that finished filling takes the next running slot)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            for cache in (keys, values):
                held = cache[a, :, :length_a].clone()
                cache[a, :, :length_b] = cache[b, :, :length_b]
                cache[b, :, :length_a] = held

    @torch.inference_mode()
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Slot ``dst`` takes over row ``src`` (a row ended: the last row fills its slot)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    # ---- the step ---------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits (rows, vocab) for each running row's next token; row r's new token sits at
        ``positions[r]`` (its length so far) and its keys/values are written there."""
        n = len(tokens)
        attended = min(self.context, -(-(max(positions) + 1) // LENGTH_STEP) * LENGTH_STEP)
        tok = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        return self._step(tok, pos, n, attended)

    def step(self, tok: torch.Tensor, pos: torch.Tensor, n: int, attended: int) -> torch.Tensor:
        rows = torch.arange(n, device=tok.device)
        x = self.embed[tok].float()
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # (n, 1, d)
        for i, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            q, k, v = qkv(_rms_norm(x, ln1, self.eps))
            q = _rope(q.view(n, self.heads, self.head_dim), cos, sin)
            k = _rope(k.view(n, self.kv_heads, self.head_dim), cos, sin)
            keys, values = self.keys[i], self.values[i]
            keys[rows, :, pos] = k.to(keys.dtype)
            values[rows, :, pos] = v.view(n, self.kv_heads, self.head_dim).to(keys.dtype)
            if self.kv_half:  # a plain bool, fixed at start (a constant to the compiler)
                out = kv.attend_half(q, keys, values, pos)
            else:
                out = kv.attend_float(q, keys[:, :, :attended], values[:, :, :attended], pos, self.gqa)
            x = x + o_proj(out.reshape(n, self.heads * self.head_dim))[0]
            g, u = gate_up(_rms_norm(x, ln2, self.eps))
            x = x + down(torch.nn.functional.silu(g) * u)[0]
        return self.head(_rms_norm(x, self.norm, self.eps))

    def warm_up(self, lengths: Sequence[int] | None = None) -> float:
        """Run (and, compiled, compile) the step once per row count in ``lengths``; seconds taken. By
        default every graph serving may need, before /ready: one row (compilers specialise on 1), a few
        rows, and more than SMALL_ROWS (its own kernels) — else the first busy moment compiles, stalling
        every running answer for seconds."""
        if lengths is None:
            lengths = (1, 2, SMALL_ROWS + 1, self.max_rows)
        t0 = time.perf_counter()
        for n in dict.fromkeys(lengths):
            if n <= self.max_rows:
                self.decode([0] * n, [1] * n)
        return time.perf_counter() - t0


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
