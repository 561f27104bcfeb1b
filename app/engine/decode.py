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

**Every dtype and kernel is chosen on the machine it runs on**, never assumed: which weights serve
a decode step and a prompt (GPTQ's 4-bit kernel, or a dense bfloat16 or float32 copy read back
through that kernel, within ``dense_bytes``) and the LM head's dtype are timed at start on this CPU
(``choose_paths``, ``choose_head_dtype``: milliseconds) and the fastest kept. bfloat16 reads half
the bytes of float32 but is several times slower on CPUs without native bf16 (AVX2-only), where
a dense float32 copy can beat the 4-bit kernel for a small model; settings force any path.
Layers that are not GPTQ's CPU kernel with an identity input order (an unquantized checkpoint,
``desc_act``) run as themselves inside the step. Checkpoints it does not cover (other
architectures, biases, sliding windows, unusual RoPE) keep the model's forward: ``supports`` says why.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# attended lengths are rounded up to a multiple of this: fewer distinct shapes, little waste
LENGTH_STEP = 64


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


class Projection:
    """Linear layers over one input, computed together: ``__call__(x)`` -> their outputs in float32.

    GPTQ's CPU kernel (``aten::_weight_int4pack_mm_for_cpu``) gets its packed weights stacked into
    one matmul; any other layer runs as itself."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = list(modules)
        self.splits = [int(m.out_features) for m in modules]
        self.fused = all(_int4_cpu_ready(m) for m in modules) and len({m.group_size for m in modules}) == 1
        if self.fused:
            self.qweight = torch.cat([m.qweight for m in modules], 0).contiguous()
            self.scales_and_zeros = torch.cat([m.scales_and_zeros for m in modules], 1).contiguous()
            self.group_size = int(modules[0].group_size)
        self.dense: dict[torch.dtype, torch.Tensor] = {}
        self.small_path = self.large_path = self.prompt_path = "int4"

    def densify(self, dtype: torch.dtype) -> int:
        """Keep a dense copy of the weights in ``dtype``. The copy is what the 4-bit kernel computes
        with: it is read back through the kernel itself (the GPTQ checkpoint stays the source of
        truth). Returns its bytes (0 for a layer that is not a 4-bit kernel layer)."""
        if not self.fused:
            return 0
        if dtype not in self.dense:
            eye = torch.eye(self.qweight.shape[1] * 2, dtype=torch.bfloat16, device=self.qweight.device)
            weight = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.qweight, self.group_size, self.scales_and_zeros
            )
            self.dense[dtype] = weight.t().contiguous().to(dtype)  # (out, in)
        return self.dense[dtype].numel() * self.dense[dtype].element_size()

    def use(self, small: str, large: str, prompt: str) -> None:
        """Which weights serve a decode step of few rows (up to SMALL_ROWS), of more rows, and a prompt:
        ``int4`` (GPTQ's kernel) or a dense copy (``bfloat16``, ``float32``); unused copies are freed."""
        if not self.fused:
            return
        self.small_path, self.large_path, self.prompt_path = small, large, prompt
        keep = {_DTYPES[p] for p in (small, large, prompt) if p != "int4"}
        for dtype in keep:
            self.densify(dtype)
        self.dense = {d: w for d, w in self.dense.items() if d in keep}

    def run(self, x: torch.Tensor, path: str) -> list[torch.Tensor]:
        """Outputs (float32) through one path; any layer that is not a 4-bit kernel layer runs as itself."""
        if not self.fused:
            return [m(x).float() for m in self.modules]
        if path == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), self.qweight, self.group_size, self.scales_and_zeros
            ).float()
        else:
            dense = self.dense[_DTYPES[path]]
            out = torch.nn.functional.linear(x.to(dense.dtype), dense).float()
        return list(out.split(self.splits, dim=-1))

    def wide(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs for many rows (a prompt)."""
        return self.run(x, self.prompt_path)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        # one row is bound by reading the weights (4-bit wins), many rows by arithmetic (a dense copy can)
        return self.run(x, self.small_path if x.shape[0] <= SMALL_ROWS else self.large_path)

    def bytes(self, path: str) -> int:
        """What a dense copy for ``path`` costs (0 for the kernel's own weights)."""
        if not self.fused or path == "int4":
            return 0
        return sum(self.splits) * self.modules[0].in_features * _DTYPES[path].itemsize


# the weight paths a projection can run through, and the dtype of each dense copy
PATHS = ("int4", "bfloat16", "float32")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# rows timed for a prompt when choosing its path (a question with its evidence block is a few hundred tokens)
PROMPT_PROBE_ROWS = 256
# decode steps of up to this many rows have their own weight path (timed at 1 row; larger steps at max_rows)
SMALL_ROWS = 4


def choose_paths(
    projections: Sequence[Projection], max_rows: int, budget: int, decode: str, prompt: str, reps: int = 5
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Time each weight path on this CPU on the largest projection, for a decode step of one row, of
    a full batch, and for a prompt, and pick for each the fastest of the paths whose dense copies fit
    ``budget``. A path given (not ``auto``) is kept. Returns ({small, large, prompt}, timings in ms)."""
    fused = [p for p in projections if p.fused]
    if not fused:
        return {"small": "int4", "large": "int4", "prompt": "int4"}, {}
    probe = max(fused, key=lambda p: sum(p.splits) * p.modules[0].in_features)
    fits = {path: sum(p.bytes(path) for p in fused) <= budget for path in PATHS}
    kinds = {"small": 1, "large": max(max_rows, SMALL_ROWS + 1), "prompt": PROMPT_PROBE_ROWS}
    timings: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
    with torch.inference_mode():
        for path in PATHS:
            if not fits[path]:
                continue
            if path != "int4":
                probe.densify(_DTYPES[path])
            for kind, n in kinds.items():
                x = torch.randn(n, probe.modules[0].in_features)
                probe.run(x, path)
                t0 = time.perf_counter()
                for _ in range(reps):
                    probe.run(x, path)
                timings[kind][path] = round(1000 * (time.perf_counter() - t0) / reps, 4)
    probe.dense = {}
    given = {"small": decode, "large": decode, "prompt": prompt}
    chosen = {k: v if v != "auto" else min(timings[k], key=timings[k].__getitem__) for k, v in given.items()}
    return chosen, timings


def _int4_cpu_ready(module: torch.nn.Module) -> bool:
    """A GPTQ CPU layer already in its packed inference form, with an identity input order."""
    if getattr(module, "linear_mode", None) != "inference" or not hasattr(module, "scales_and_zeros"):
        return False
    ret_idx = getattr(module, "ret_idx", None)
    return ret_idx is None or torch.equal(ret_idx.long().cpu(), torch.arange(ret_idx.numel()))


def choose_head_dtype(head: torch.Tensor, max_rows: int, reps: int = 5) -> tuple[str, dict[str, float]]:
    """Time the LM head's matmul in float32 and bfloat16 on this CPU (one row and a full batch) and
    pick the faster: bfloat16 reads half the bytes, but without native bf16 instructions (AVX2-only
    CPUs) it was measured 5-10x slower, so no dtype is assumed. A few milliseconds at start."""
    timing: dict[str, float] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        weight = head.to(dtype)
        total = 0.0
        for rows in (1, max_rows):
            x = torch.randn(rows, head.shape[0], dtype=dtype)
            (x @ weight).float()  # warm the kernel and its caches
            t0 = time.perf_counter()
            for _ in range(reps):
                (x @ weight).float()
            total += (time.perf_counter() - t0) / reps
        timing[name] = round(1000 * total, 4)
    return min(timing, key=timing.__getitem__), timing


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The instruction sets that decide which kernels are fast here (benchmarks record them too)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    return tuple(f for f in wanted if f in line.split())


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
        # the LM head is most of the bytes a step reads (70% for the default model); a matrix-vector
        # product reads a (hidden, vocab) weight about twice as fast as the (vocab, hidden) one
        # nn.Linear keeps (0.47 vs 0.95 ms here), so it is kept transposed; bfloat16 halves it again
        head = model.lm_head.weight.detach().t().contiguous()
        self.head_timing: dict[str, float] = {}
        if lm_head == "auto":
            lm_head, self.head_timing = choose_head_dtype(head, max_rows)
        self.head_dtype = torch.bfloat16 if lm_head == "bfloat16" else torch.float32
        self.head = head.to(self.head_dtype)
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
            if path not in (*PATHS, "auto"):
                raise ValueError(f"unknown weight path {path!r} (one of auto, {', '.join(PATHS)})")
            need = sum(p.bytes(path) for p in projections) if path != "auto" else 0
            if need > dense_bytes:
                raise ValueError(
                    f"dense {path} weights need {need / 2**20:.0f} MiB, more than the {dense_bytes / 2**20:.0f} MiB "
                    "allowed for dense copies: choose int4 or auto"
                )
        chosen, self.weight_timing = choose_paths(projections, max_rows, dense_bytes, decode_weights, prompt_weights)
        self.decode_small, self.decode_large, self.prompt_weights = chosen["small"], chosen["large"], chosen["prompt"]
        for proj in projections:
            proj.use(self.decode_small, self.decode_large, self.prompt_weights)
        self.dense_bytes = sum(w.numel() * w.element_size() for p in projections for w in p.dense.values())
        positions = torch.arange(self.context, device=device)[None]
        probe = torch.zeros(1, device=device, dtype=torch.float32)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].float(), sin[0].float()  # (context, head_dim)
        shape = (max_rows, self.kv_heads, self.context, self.head_dim)
        self.keys = [torch.zeros(shape, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, device=device) for _ in self.layers]
        self.compiled = False
        self._step: Callable[..., torch.Tensor] = self.step
        if compile:
            self._step = torch.compile(self.step, dynamic=True, fullgraph=True)
            self.compiled = True

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
    def prefill(self, slot: int, ids: Sequence[int]) -> torch.Tensor:
        """Run a prompt into ``slot`` (its keys and values written in place, no padding, no copy);
        returns the logits (vocab,) of its next token."""
        n = len(ids)
        x = self.embed[torch.tensor(ids, device=self.device)].float()
        cos, sin = self.cos[:n][:, None, :], self.sin[:n][:, None, :]
        for i, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            q, k, v = qkv.wide(_rms_norm(x, ln1, self.eps))
            q = _rope(q.view(n, self.heads, self.head_dim), cos, sin).transpose(0, 1)
            k = _rope(k.view(n, self.kv_heads, self.head_dim), cos, sin).transpose(0, 1)
            v = v.view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            self.keys[i][slot, :, :n] = k
            self.values[i][slot, :, :n] = v
            out = torch.nn.functional.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, enable_gqa=self.gqa
            )[0]
            x = x + o_proj.wide(out.transpose(0, 1).reshape(n, self.heads * self.head_dim))[0]
            g, u = gate_up.wide(_rms_norm(x, ln2, self.eps))
            x = x + down.wide(torch.nn.functional.silu(g) * u)[0]
        return (_rms_norm(x[-1:], self.norm, self.eps).to(self.head_dtype) @ self.head).float()[0]

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
        visible = (torch.arange(attended, device=tok.device)[None, :] <= pos[:, None])[:, None, None, :]
        for i, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            q, k, v = qkv(_rms_norm(x, ln1, self.eps))
            q = _rope(q.view(n, self.heads, self.head_dim), cos, sin)
            k = _rope(k.view(n, self.kv_heads, self.head_dim), cos, sin)
            self.keys[i][rows, :, pos] = k
            self.values[i][rows, :, pos] = v.view(n, self.kv_heads, self.head_dim)
            out = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None, :],
                self.keys[i][:n, :, :attended],
                self.values[i][:n, :, :attended],
                attn_mask=visible,
                enable_gqa=self.gqa,
            )
            x = x + o_proj(out.reshape(n, self.heads * self.head_dim))[0]
            g, u = gate_up(_rms_norm(x, ln2, self.eps))
            x = x + down(torch.nn.functional.silu(g) * u)[0]
        return (_rms_norm(x, self.norm, self.eps).to(self.head_dtype) @ self.head).float()

    def warm_up(self, lengths: Sequence[int] = (1, 2)) -> float:
        """Run (and, compiled, compile) the step once per row count in ``lengths``; seconds taken."""
        t0 = time.perf_counter()
        for n in lengths:
            if n <= self.max_rows:
                self.decode([0] * n, [1] * n)
        return time.perf_counter() - t0


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
