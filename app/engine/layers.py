"""The static decode step's linear layers: the fused projections (``Projection``) and the LM head
(``Head``), each running through a kernel of ``app.engine.kernels``, and the timing at start that
picks those kernels on this CPU (``choose_paths``, ``choose_head``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from app.engine import kernels


class Projection:
    """Linear layers over one input, computed together: ``__call__(x)`` -> their outputs in float32.

    GPTQ's CPU kernel (``aten::_weight_int4pack_mm_for_cpu``) gets its packed weights stacked into
    one matmul; any other layer runs as itself. Other kernels (``app.engine.kernels``) get a copy
    of the stacked weights read back through GPTQ's kernel."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = list(modules)
        self.splits = [int(m.out_features) for m in modules]
        self.in_features = int(modules[0].in_features)
        self.fused = all(_int4_cpu_ready(m) for m in modules) and len({m.group_size for m in modules}) == 1
        if self.fused:
            self.qweight = torch.cat([m.qweight for m in modules], 0).contiguous()
            self.scales_and_zeros = torch.cat([m.scales_and_zeros for m in modules], 1).contiguous()
            self.group_size = int(modules[0].group_size)
        self.packed: dict[str, Any] = {}
        self.small_path = self.large_path = self.prompt_path = "int4"

    def weight(self) -> torch.Tensor:
        """The 4-bit weights (out, in) in float32, read back through GPTQ's kernel itself."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.qweight.device)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, self.scales_and_zeros)
        return out.t().float().contiguous()

    def groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 4-bit weights' scale and zero per group, (out, groups) float32, as GPTQ's kernel keeps them."""
        return self.scales_and_zeros[..., 0].t().float(), self.scales_and_zeros[..., 1].t().float()

    def prepare(self, kernel: str) -> None:
        """Keep the weights packed for ``kernel`` (nothing for the 4-bit kernel or a layer that is not
        a 4-bit kernel layer). A KernelError: this layer's weights cannot take that kernel."""
        if self.fused and kernel != "int4" and kernel not in self.packed:
            groups = self.groups() if kernel in kernels.GROUPED else None
            self.packed[kernel] = kernels.Packed(kernel, self.weight(), groups)

    def use(self, small: str, large: str, prompt: str) -> None:
        """Which kernel serves a decode step of few rows (up to SMALL_ROWS), of more rows, and a
        prompt; copies no path uses are freed."""
        if not self.fused:
            return
        self.small_path, self.large_path, self.prompt_path = small, large, prompt
        keep = {small, large, prompt} - {"int4"}
        for kernel in keep:
            self.prepare(kernel)
        self.packed = {k: w for k, w in self.packed.items() if k in keep}

    def run(self, x: torch.Tensor, path: str) -> list[torch.Tensor]:
        """Outputs (float32) through one kernel; any layer that is not a 4-bit kernel layer runs as itself."""
        if not self.fused:
            return [m(x).float() for m in self.modules]
        if path == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), self.qweight, self.group_size, self.scales_and_zeros
            ).float()
        else:
            out = self.packed[path](x)
        return list(out.split(self.splits, dim=-1))

    def wide(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs for many rows (a prompt)."""
        return self.run(x, self.prompt_path)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        # one row is bound by reading the weights (4-bit wins), many rows by arithmetic (a dense copy can);
        # the row count is only looked at when the paths differ: compiled, the test is a guard, and a
        # guard is a second graph to compile
        if self.small_path == self.large_path:
            return self.run(x, self.small_path)
        return self.run(x, self.small_path if x.shape[0] <= SMALL_ROWS else self.large_path)

    def bytes(self, kernel: str) -> int:
        """What a copy for ``kernel`` costs (0 for the kernel's own weights)."""
        if not self.fused:
            return 0
        return kernels.nbytes(kernel, sum(self.splits), self.in_features)


# rows timed for a prompt when choosing its path (a question with its evidence block is a few hundred tokens)
PROMPT_PROBE_ROWS = 256
# decode steps of up to this many rows have their own weight path (timed at 1 row; larger steps at max_rows)
SMALL_ROWS = 4


def choose_paths(
    projections: Sequence[Projection],
    max_rows: int,
    budget: int,
    decode: str,
    prompt: str,
    candidates: Sequence[str] = kernels.AUTO_KERNELS,
    reps: int = 5,
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Time each candidate kernel on this CPU on the largest projection, for a decode step of one
    row, of a full batch, and for a prompt, and pick for each the fastest of those whose copies fit
    ``budget``. A kernel given (not ``auto``) is kept. Returns ({small, large, prompt}, timings in ms)."""
    fused = [p for p in projections if p.fused]
    if not fused:
        return {"small": "int4", "large": "int4", "prompt": "int4"}, {}
    probe = max(fused, key=lambda p: sum(p.splits) * p.in_features)
    timed = [k for k in candidates if sum(p.bytes(k) for p in fused) <= budget and kernels.available(k) is None]
    kinds = {"small": 1, "large": max(max_rows, SMALL_ROWS + 1), "prompt": PROMPT_PROBE_ROWS}
    timings: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for kernel in list(timed):
            try:
                probe.prepare(kernel)
            except kernels.KernelError:  # not for these weights (a native 4-bit kernel on weights off GPTQ's grid)
                timed.remove(kernel)
        for kind, n in kinds.items():
            x = torch.randn(n, probe.in_features)
            calls = {k: (lambda k=k, x=x: probe.run(x, k)) for k in timed}
            timings[kind] = kernels.time_interleaved(calls, reps)
    probe.packed = {}
    given = {"small": decode, "large": decode, "prompt": prompt}
    chosen = {k: v if v != "auto" else kernels.fastest(timings[k], timed) for k, v in given.items()}
    return chosen, timings


def _int4_cpu_ready(module: torch.nn.Module) -> bool:
    """A GPTQ CPU layer already in its packed inference form, with an identity input order."""
    if getattr(module, "linear_mode", None) != "inference" or not hasattr(module, "scales_and_zeros"):
        return False
    ret_idx = getattr(module, "ret_idx", None)
    return ret_idx is None or torch.equal(ret_idx.long().cpu(), torch.arange(ret_idx.numel()))


class Head:
    """The LM head's weights in one kernel for decode steps of up to SMALL_ROWS rows (``kernel``) and,
    where another wins there, one for more rows (``large``): one row is bound by reading the weights,
    many by arithmetic, as for the projections. It is most of the bytes a step reads (70% for the
    default model). float32 and bfloat16 keep it transposed (hidden, vocab): a matrix-vector product
    reads it about twice as fast as the (vocab, hidden) nn.Linear keeps (0.47 vs 0.95 ms, AVX-512)."""

    def __init__(self, weight: torch.Tensor, kernel: str, large: str | None = None) -> None:
        self.kernel, self.large = kernel, large or kernel
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.paths: dict[str, Any] = {k: _head_path(weight, k) for k in dict.fromkeys((self.kernel, self.large))}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the row count is looked at only when the kernels differ (compiled: a guard, a second graph)
        kernel = self.kernel if self.kernel == self.large or x.shape[0] <= SMALL_ROWS else self.large
        path = self.paths[kernel]
        if isinstance(path, torch.Tensor):
            return (x.to(path.dtype) @ path).float()
        return path(x)


def _head_path(weight: torch.Tensor, kernel: str) -> Any:
    if kernel in ("float32", "bfloat16"):
        return weight.t().contiguous().to(kernels.DTYPES[kernel])
    return kernels.Packed(kernel, weight)


def choose_head(
    weight: torch.Tensor,
    max_rows: int,
    candidates: Sequence[str] = ("float32", "bfloat16", "float16", "float16-avx2"),
    reps: int = 5,
) -> tuple[str, str, dict[str, dict[str, float]]]:
    """Time the LM head in each candidate kernel on this CPU, at one row and at a full batch, and pick
    the fastest for each (small, large, timings): bfloat16 reads half the bytes, but without native bf16
    instructions (AVX2-only CPUs) it was measured 5-10x slower, so no kernel is assumed. A few
    milliseconds at start."""
    heads = {k: Head(weight, k) for k in candidates if k not in kernels.FOUR_BIT and kernels.available(k) is None}
    timing: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for kind, rows in (("small", 1), ("large", max(max_rows, SMALL_ROWS + 1))):
            x = torch.randn(rows, weight.shape[1])
            calls = {k: (lambda h=h, x=x: h(x)) for k, h in heads.items()}
            timing[kind] = {k: round(v, 4) for k, v in kernels.time_interleaved(calls, reps).items()}
    small, large = (kernels.fastest(timing[kind], list(timing[kind])) for kind in ("small", "large"))
    return small, large, timing
