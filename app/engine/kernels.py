"""The weight kernels a linear layer of the static decode step can run through on a CPU, and the
timing that picks one on the machine it runs on.

GPTQ's 4-bit checkpoint is the source of truth: every other kernel's weights are the 4-bit weights
read back through GPTQ's own kernel (``Projection.weight``), then stored the way that kernel wants
them. None is assumed fast: which wins depends on the CPU (native bf16 or not, AVX-512 or AVX2),
on the rows multiplied at once (one row is bound by reading the weights, many rows by arithmetic)
and on the layer's shape, so each is timed at start (``app.engine.layers.choose_paths`` and
``choose_head``, milliseconds).

- ``int4``: GPTQ's CPU kernel (``aten._weight_int4pack_mm_for_cpu``), bfloat16 activations.
- ``bfloat16``, ``float32``: a dense copy, ``torch.nn.functional.linear``.
- ``float16``: FBGEMM's fp16-weight GEMM (``quantized::linear_dynamic_fp16``): half the bytes of
  float32, float32 arithmetic (weights widened with F16C, present on every AVX2 CPU). The 4-bit
  weights times their fp16 scales round to fp16 exactly enough that held-out bits/byte does not move.
- ``int4-avx2``: MedAsk's own kernel (``app.engine.native``, C++, built at install): the 4-bit weights
  and their group scales as GPTQ stores them, widened in registers and multiplied by float32
  activations; exact arithmetic (no bfloat16 input, unlike ``int4``) and half float16's bytes.
- ``float16-avx2``: the same for float16 weights (the LM head as the checkpoint stores it).
- ``int4x8-avx2``: ``int4-avx2``'s weights times activations rounded to 8 bits per row and group of
  inputs, integer pair products (``maddubs``) summed over a group: the arithmetic of ggml's Q4 x Q8
  dot, about 1.2-1.5x ``int4-avx2``'s speed at one row here. It changes the arithmetic, so it is
  checked at start like int8. Where the CPU has AVX-512 VNNI, it and ``int8-avx2`` sum the byte products of
  tiles of 2-4 rows with ``vpdpbusd`` instead (the same outputs bit for bit; ``app.engine.native.integer_dot``).
- ``int8-avx2``: int8's weights (one scale per output) times 8-bit activations per row and group, in
  MedAsk's C++ kernel (ggml's Q8_0 x Q8_0 dot): for the LM head, which the checkpoint keeps in 16 bits.
  Checked at start like int8.
- ``int8``: FBGEMM's dynamic int8 GEMM (``quantized::linear_dynamic``): int8 weights per output
  channel, activations quantized per row on a fixed grid (``_int8_rows``), integer dot products
  (VNNI where present): the arithmetic ggml's Q8_0 dot uses. Where the native library is loaded, the
  per-row scaling around FBGEMM's product runs in C++ (``medask_native::int8_rows``, the same outputs bit
  for bit): one call instead of eleven from Python, which a compiled step makes without the interpreter lock.

The 8-bit-activation kernels (``EIGHT_BIT``) change the arithmetic: auto may choose one only when, at
start, it scores text beside the checkpoint within +0.5% of the 4-bit kernel (``/info``
``decode.int8_check``); ``benchmarks/kernels.py`` measures their held-out bits/byte.

The native kernels are C++ operators a compiled step calls directly; they exist only where the
library was built and the CPU has AVX2, FMA and F16C (``app.engine.native.load`` says why not).
FBGEMM's ops are deprecated upstream (torch's quantized tensors) but present in the pinned torch;
an op that is missing or fails is not a candidate, and forcing it is a start-up error. Their packed
weights are TorchScript objects that torch.compile cannot trace, so a compiled step reaches them
through one operator that takes an index into a table of packed weights: an opaque call with a known
output shape (``medask_native::int8_rows`` for int8 where the native library is loaded, its table in
C++; else ``medask::packed_linear``). Eager calls go to FBGEMM directly.
"""

from __future__ import annotations

import functools
import itertools
import time
import weakref
from collections.abc import Sequence
from typing import Any

import torch

# every kernel a setting may name, reference first
KERNELS = ("int4", "float32", "bfloat16", "float16", "int8", "int4-avx2", "float16-avx2", "int4x8-avx2", "int8-avx2")
# what ``auto`` always chooses among: the 8-bit-activation kernels change the arithmetic, so they join
# them only when they pass the check at start (``StaticDecoder._check_int8``) or are named in a setting
AUTO_KERNELS = ("int4", "float32", "bfloat16", "float16", "int4-avx2", "float16-avx2")
# kernels that round activations to 8 bits
EIGHT_BIT = ("int8", "int8-avx2", "int4x8-avx2")
# MedAsk's kernels of GPTQ's 4-bit values and group scales (``int4_groups``)
GROUPED = ("int4-avx2", "int4x8-avx2")
# kernels of 4-bit weights only (not for the LM head, which the checkpoint keeps in 16 bits)
FOUR_BIT = ("int4", *GROUPED)
# kernels of app.engine.native
NATIVE = ("int4-avx2", "float16-avx2", "int4x8-avx2", "int8-avx2")
# FBGEMM's packed weights (TorchScript objects: reached through an operator taking an index, see Packed)
FBGEMM = ("float16", "int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# GPTQ's CPU kernel stores a group's 4-bit values q as w = (q - 8) * scale + zero
INT4_MIDPOINT = 8


def int4_groups(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 4-bit kernel's operands for ``weight`` (out, in) float32, whose groups hold 4-bit values on
    ``scale`` and ``zero`` (out, groups): (packed (out, in/2) uint8 in ggml's Q4_0 block order, scale,
    offset) with w = q * scale + offset. Weights off that grid are a KernelError (not a 4-bit layer)."""
    out, n = weight.shape
    groups = scale.shape[1]
    if n % groups or (n // groups) % 32:
        raise KernelError(f"int4-avx2: {n} inputs in {groups} groups (groups of a multiple of 32 inputs needed)")
    w = weight.float().view(out, groups, n // groups)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((w - z) / s + INT4_MIDPOINT).clamp(0, 15)
    # the weights were read back through a kernel with bfloat16 output: on the grid within its rounding
    if ((q - INT4_MIDPOINT) * s + z - w).abs().amax() > w.abs().amax() * 2**-7 + 1e-12:
        raise KernelError("int4-avx2: the weights are not 4-bit values on their group scales")
    blocks = q.to(torch.uint8).view(out, n // 32, 2, 16)  # ggml's order: byte j = input j (low), j + 16 (high)
    packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, n // 2).contiguous()
    offset = (zero.float() - INT4_MIDPOINT * scale.float()).contiguous()
    return packed, scale.float().contiguous(), offset


class KernelError(ValueError):
    """A kernel named in the settings cannot run here (missing op, no memory budget for it)."""


def _pack(kernel: str, weight: torch.Tensor, groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
    if kernel in GROUPED:
        if groups is None:
            raise KernelError(f"{kernel} runs 4-bit layers only (their group scales are needed)")
        return int4_groups(weight, *groups)
    weight = weight.float().contiguous()
    if kernel == "float16-avx2":
        return weight.half().contiguous()
    if kernel == "float32":
        return weight
    if kernel == "bfloat16":
        return weight.to(torch.bfloat16)
    if kernel == "float16":
        return torch.ops.quantized.linear_prepack_fp16(weight, None)
    if kernel == "int8-avx2":
        if weight.shape[1] % 32:
            raise KernelError(f"int8-avx2: {weight.shape[1]} inputs (a multiple of 32 needed)")
        scale = (weight.abs().amax(1) / 127).clamp(min=1e-12)
        return torch.round(weight / scale[:, None]).to(torch.int8).contiguous(), scale.contiguous()
    if kernel == "int8":
        scale = (weight.abs().amax(1) / 127).clamp(min=1e-12).double()
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        q = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)
    raise KernelError(f"unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")


def _multiply(kernel: str, x: torch.Tensor, packed: Any) -> torch.Tensor:
    if kernel == "int4-avx2":
        w, scale, offset = packed
        return torch.ops.medask_native.q4_linear(x, w, scale, offset, x.shape[-1] // scale.shape[1])
    if kernel == "int4x8-avx2":
        w, scale, offset = packed
        return torch.ops.medask_native.q4q8_linear(x, w, scale, offset, x.shape[-1] // scale.shape[1])
    if kernel == "float16-avx2":
        return torch.ops.medask_native.f16_linear(x, packed)
    if kernel == "int8-avx2":
        w, scale = packed
        return torch.ops.medask_native.i8_linear(x, w, scale, eight_bit_group(x.shape[-1]))
    if kernel == "float32":
        return torch.nn.functional.linear(x, packed)
    if kernel == "bfloat16":
        return torch.nn.functional.linear(x.to(torch.bfloat16), packed).float()
    if kernel == "float16":
        return torch.ops.quantized.linear_dynamic_fp16(x, packed)
    if kernel == "int8":
        return _int8_rows(x, packed)
    raise KernelError(f"unknown kernel {kernel!r}")


def _native_rows() -> bool:
    """Whether app.engine.native's int8_rows runs here (its library loaded); else _int8_rows in Python."""
    from app.engine import native

    return native.load() is None


def eight_bit_group(in_features: int) -> int:
    """Inputs per activation scale in ``int8-avx2`` (128 as GPTQ's groups, where they divide the row)."""
    return 128 if in_features % 128 == 0 else 32


def _int8_rows(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """FBGEMM's dynamic int8 GEMM with each row's activations quantized on their own scale.

    FBGEMM picks one scale and zero point for the whole input (its min and max), so a row's result
    would depend on the rows beside it in the batch. Each row is divided by its largest magnitude and
    one row holding exactly +1 and -1 is added, so the input's range is always [-1, 1]: every row is
    quantized on the same fixed grid, per row as ggml's Q8_0 is per block, and its result does not
    depend on its batch-mates (the GEMM accumulates in int32, exactly). reduce_range: 7-bit
    activations, so AVX2's u8 x s8 pair sums cannot saturate."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    bounds = torch.zeros(1, x.shape[-1], dtype=x.dtype, device=x.device)
    bounds[0, 0], bounds[0, -1] = 1.0, -1.0
    out = torch.ops.quantized.linear_dynamic(torch.cat([x / scale, bounds]), packed, True)
    return out[:-1] * scale


# packed FBGEMM weights by index, for the operator; an entry leaves with the Packed that made it
_TABLE: dict[int, Any] = {}
_NEXT = itertools.count()


def _packed_linear(x: torch.Tensor, kernel: str, index: int, out_features: int) -> torch.Tensor:
    return _multiply(kernel, x, _TABLE[index])


def _packed_linear_shape(x: torch.Tensor, kernel: str, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


# a plain operator (not torch.library.custom_op, whose wrapper costs about 10 us a call, 17 calls a step)
_LIBRARY = torch.library.Library("medask", "DEF")
_LIBRARY.define("packed_linear(Tensor x, str kernel, int index, int out_features) -> Tensor")
_LIBRARY.impl("packed_linear", _packed_linear, "CPU")
torch.library.register_fake("medask::packed_linear", _packed_linear_shape, lib=_LIBRARY)


class Packed:
    """One weight matrix packed for one kernel. ``Packed(kernel, weight)`` with ``weight`` (out, in)
    in float32 (and, for ``int4-avx2``, ``groups``: its scale and zero (out, groups)); calling it with
    x (rows, in) float32 gives (rows, out) float32. Not for ``int4``."""

    def __init__(
        self, kernel: str, weight: torch.Tensor, groups: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        self.kernel = kernel
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        packed = _pack(kernel, weight, groups)
        # tensors (a weight, or int4-avx2's three operands) a compiled graph can trace
        self.traceable = None if kernel in FBGEMM else packed
        self.fbgemm = packed if kernel in FBGEMM else None  # FBGEMM's TorchScript object (its weights)
        self.index = -1
        # int8 through app.engine.native's int8_rows where the library is loaded: the same outputs bit for bit
        # as _int8_rows, one C++ call (eager or compiled) instead of eleven torch calls from Python
        self.native = -1
        if kernel == "int8" and _native_rows():
            self.native = int(torch.ops.medask_native.keep_int8(packed))
            weakref.finalize(self, torch.ops.medask_native.drop_int8, self.native)
        elif self.traceable is None:  # a TorchScript object: reached through the operator when compiled
            self.index = next(_NEXT)
            _TABLE[self.index] = packed
            weakref.finalize(self, _TABLE.pop, self.index, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native >= 0:
            return torch.ops.medask_native.int8_rows(x, self.native, self.out_features)
        if self.traceable is not None:
            return _multiply(self.kernel, x, self.traceable)
        if torch.compiler.is_compiling():  # the operator is what the compiled graph can call
            return torch.ops.medask.packed_linear(x, self.kernel, self.index, self.out_features)
        return _multiply(self.kernel, x, _TABLE[self.index])

    @property
    def bytes(self) -> int:
        return nbytes(self.kernel, self.out_features, self.in_features)


def nbytes(kernel: str, out_features: int, in_features: int) -> int:
    """Memory a packed copy takes (0 for the 4-bit kernel's own weights; the native 4-bit kernels counted
    with groups of 128 inputs)."""
    if kernel in GROUPED:
        return out_features * in_features // 2 + 8 * out_features * max(1, in_features // 128)
    per = {"int4": 0, "float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float16-avx2": 2, "int8-avx2": 1}[kernel]
    scales = {"int8": 8, "int8-avx2": 4}.get(kernel, 0)  # bytes of each output's scale
    return out_features * in_features * per + scales * out_features


@functools.cache
def available(kernel: str) -> str | None:
    """Why ``kernel`` cannot run on this torch build (None: it can); tried once per process."""
    if kernel in ("int4", "float32", "bfloat16"):
        return None
    if kernel in NATIVE:
        from app.engine import native

        if why := native.load():
            return f"{kernel}: {why}"
    try:
        # 4-bit values times a power of two: exact in every kernel's weight format
        scale, zero = torch.full((8, 1), 0.125), torch.zeros(8, 1)
        weight = (torch.randint(0, 16, (8, 128)) - INT4_MIDPOINT) * scale
        x = torch.randn(2, 128)
        out = Packed(kernel, weight, (scale, zero))(x)
        if out.shape != (2, 8):
            return f"{kernel} gave shape {tuple(out.shape)}"
        error = (out - x @ weight.t()).abs()
        allowed: Any = 0
        if kernel in EIGHT_BIT:  # each input (one group of 128 here) and 8-bit weight off by half a step
            allowed = x.abs().amax(-1, keepdim=True) / 254 * weight.abs().sum(1)
            if kernel not in FOUR_BIT:
                allowed = allowed + x.abs().sum(-1, keepdim=True) * weight.abs().amax(1) / 254
        if kernel in NATIVE and not bool((error <= allowed + 1e-3).all()):
            return f"{kernel} gave wrong products on this CPU"
    except Exception as exc:  # an op missing from this build, an engine without it
        return f"{kernel}: {type(exc).__name__}: {exc}"[:300]
    return None


def time_call(fn: Any, reps: int = 5, give_up_ms: float | None = None) -> float:
    """Milliseconds per call, after one warming call (kernels pack and cache on their first). A warming
    call slower than ``give_up_ms`` is the answer: a kernel several times slower than the best so far
    is not timed further (bfloat16 on a CPU without native bf16 takes about a second to time fully)."""
    t0 = time.perf_counter()
    fn()
    first = 1000 * (time.perf_counter() - t0)
    if give_up_ms is not None and first > give_up_ms:
        return round(first, 4)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return round(1000 * (time.perf_counter() - t0) / reps, 4)


# rounds of interleaved timing: each candidate's least time is kept
ROUNDS = 3


def time_interleaved(
    calls: dict[str, Any], reps: int = 5, rounds: int = ROUNDS, give_up: float = 3.0
) -> dict[str, float]:
    """Milliseconds per call of each candidate: ``rounds`` rounds, every candidate timed in each, the least
    time kept. On a shared machine a candidate timed once can land on a busy moment (40% swings were seen
    on the 2-core machine) and lose to a slower one; noise only ever adds time, and interleaving spreads
    it over all. A candidate whose first round took over ``give_up`` times the best so far (bfloat16 on a
    CPU without native bf16: a hundred times slower) is not timed again."""
    best: dict[str, float] = {}
    dropped: set[str] = set()
    for r in range(rounds):
        for name, call in calls.items():
            if name in dropped:
                continue
            limit = give_up * min(best.values()) if best and r == 0 else None
            took = time_call(call, reps, limit)
            if limit is not None and took > limit:
                dropped.add(name)
            best[name] = min(best.get(name, took), took)
    return best


def fastest(timings: dict[str, float], candidates: Sequence[str]) -> str:
    """The candidate with the least time (ties to the earlier candidate: the reference comes first)."""
    timed = [k for k in candidates if k in timings]
    return min(timed, key=lambda k: (timings[k], timed.index(k)))
