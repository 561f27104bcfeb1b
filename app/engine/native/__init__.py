"""MedAsk's own CPU kernels (``kernels.cpp``: matrix products; ``attention.cpp``: decode attention over a
float16 KV cache; ``fbgemm_rows.cpp``: FBGEMM's int8 GEMM with per-row activation scales): built once at
install, loaded when the step starts.

    python -m app.engine.native build      # `make install` runs it (g++ and ninja; about 15 s)

The library is built into ``<venv>/medask-native/<source hash>/`` (a changed source is a new folder,
so a stale build is never loaded) through a temporary folder renamed into place: an interrupted build
leaves nothing that looks finished. Nothing is compiled while serving: a service without the library
(no compiler at install, a CPU without AVX2/FMA/F16C) keeps every other kernel, and ``/info`` and a
forced setting say why these are missing. Operators: ``torch.ops.medask_native.q4_linear``,
``q4q8_linear``, ``i8_linear``, ``f16_linear``, ``decode_attention``, ``int8_rows`` (FBGEMM's int8 GEMM
with per-row activation scales, ``fbgemm_rows.cpp``; its weights kept by ``keep_int8``) (C++, so a compiled
step calls them without a Python body); ``use_vnni`` (``integer_dot``) picks the instructions of the 8-bit
kernels' byte products.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernels.cpp", "attention.cpp", "fbgemm_rows.cpp"))
NAME = "medask_native"
# the instruction sets the kernels are compiled for (-mavx2 -mfma -mf16c): every AVX2 CPU since 2013
NEEDS = ("avx2", "fma", "f16c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def library_path() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(FLAGS).encode()).hexdigest()[:12]
    root = Path(os.environ.get("MEDASK_NATIVE_DIR") or Path(sys.prefix) / "medask-native")
    return root / digest / f"{NAME}.so"


@functools.cache
def reported_flags() -> frozenset[str]:
    """Every instruction set this CPU reports (/proc/cpuinfo; none where it cannot be read). The one reader:
    ``app.engine.decode.cpu_flags`` picks the ones kernels and benchmarks name from it."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return frozenset()
    return frozenset(next((row for row in text.splitlines() if row.startswith("flags")), "").split())


def cpu_lacks() -> list[str]:
    """The instruction sets the kernels need that this CPU does not report."""
    return [f for f in NEEDS if f not in reported_flags()]


def build(verbose: bool = False) -> Path:
    """Compile the library (if this source has not been built) and return its path."""
    from torch.utils import cpp_extension

    target = library_path()
    if target.is_file():
        return target
    # the ninja pip installed sits beside this interpreter, whose folder need not be on PATH (make runs
    # .venv/bin/python without activating the environment)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    work = target.parent.with_name(target.parent.name + f".tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        cpp_extension.load(
            name=NAME,
            sources=[str(p) for p in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(work),
            is_python_module=False,
            verbose=verbose,
        )
        if target.parent.exists():  # another build finished first: same source, same library
            return target
        work.rename(target.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


@functools.cache
def load() -> str | None:
    """Load the built library once per process; why it cannot be used (None: its operators are ready)."""
    lacks = cpu_lacks()
    if lacks:
        return f"this CPU lacks {', '.join(lacks)}"
    path = library_path()
    if not path.is_file():
        return f"not built ({path} missing: `make install` or `python -m app.engine.native build` builds it, with g++)"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return f"{path} failed to load: {exc}"[:300]
    # shapes for torch.compile: the operators are opaque calls with a known output
    torch.library.register_fake(f"{NAME}::q4_linear")(_rows_by_out)
    torch.library.register_fake(f"{NAME}::q4q8_linear")(_rows_by_out)
    torch.library.register_fake(f"{NAME}::i8_linear")(_rows_by_out)
    torch.library.register_fake(f"{NAME}::f16_linear")(_rows_by_out)
    torch.library.register_fake(f"{NAME}::decode_attention")(_like_query)
    torch.library.register_fake(f"{NAME}::int8_rows")(_rows_of)
    return None


# the instructions of the 8-bit kernels' byte products (int8-avx2, int4x8-avx2), a setting's values
INTEGER_DOTS = ("auto", "vnni", "avx2")


def integer_dot(choice: str = "auto") -> str | None:
    """Set which instructions the 8-bit kernels multiply bytes with in this process and say which: ``vnni``
    (AVX-512 VNNI's vpdpbusd, one instruction per 32 products, for tiles of 2-4 rows; one row measured no
    faster) or ``avx2`` (maddubs, madd, add). Both give the same outputs bit for bit (kernels.cpp), so auto
    takes vnni wherever the CPU has it; None: no library here. Forcing vnni on a CPU without it is a
    ValueError (a start-up error)."""
    if choice not in INTEGER_DOTS:
        raise ValueError(f"integer dot {choice!r}: one of {', '.join(INTEGER_DOTS)}")
    if (why := load()) is not None:
        if choice == "vnni":
            raise ValueError(f"integer dot vnni: MedAsk's kernels are unavailable ({why})")
        return None
    on = torch.ops.medask_native.use_vnni(0 if choice == "avx2" else 1)
    if choice == "vnni" and not on:
        raise ValueError("integer dot vnni: this CPU lacks AVX-512 VNNI (avx512_vnni with avx512vl and avx512bw)")
    return "vnni" if on else "avx2"


def _rows_by_out(x: torch.Tensor, w: torch.Tensor, *rest: object) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


def _rows_of(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


def _like_query(q: torch.Tensor, *rest: object) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
