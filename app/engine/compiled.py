"""How the static decode step is compiled: ``torch.compile`` with dynamic row counts and lengths, the
step's own copy of its code, and guards on its arguments only.

Before each call of a compiled function Dynamo checks its guards: that every object the graph was traced
from still looks as it did. The step reads a few hundred of them through the decoder (every layer's
weights, packed kernels and cache tensors, their types and the kernel names chosen at start), and
checking them took 0.1-0.4 ms a step on the AVX2 machine, 10-20% of a one-row step there (py-spy and
torch's profiler: "TorchDynamo Cache Lookup"). None of them changes after start: a decoder's weights,
kernels and caches are fixed when it is built (``StaticDecoder.__init__`` compiles last), and its caches
are written in place. So only the guards on the step's arguments (the row count, token and position
tensors: which graph serves them) and on global state (grad mode, torch function modes) are kept.

Dropping the guards on the decoder is safe only if a graph never serves another decoder: Dynamo keeps
graphs per code object, so each decoder compiles its own copy of ``step``'s code. Without the copy, a
second decoder in the process (the tests, the benchmarks) would run the first one's graphs, traced with
the first one's kernels.

For the same reason the graph's code skips Inductor's size asserts: before every call it checked the size
and strides of each tensor it reads (76 calls from Python a step, the decoder's weights and caches
among them, fixed at start; the arguments' shapes stay guarded). Without them the one-row step measured
0.578-0.625 ms against 0.636-0.771 in six interleaved rounds on the Zen 4 machine (least of 300 each), the
16-row step within 2-3%.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

# torch.compile's backend for the step (tests of the guards and the caching, which are Dynamo's, use "eager":
# the same graphs without seconds of code generation)
BACKEND = "inductor"


def compile_step(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a bound ``StaticDecoder.step``) compiled for its decoder alone."""
    import torch

    fn = method.__func__  # type: ignore[attr-defined]
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    bound = types.MethodType(own, method.__self__)  # type: ignore[attr-defined]
    options: dict[str, Any] = {"guard_filter_fn": argument_guards}
    if BACKEND == "inductor":  # an Inductor option (the eager backend of the tests warns on it)
        options["size_asserts"] = False
    return torch.compile(bound, dynamic=True, fullgraph=True, backend=BACKEND, options=options)


def argument_guards(entries: list[Any]) -> list[bool]:
    """Which of Dynamo's guards to keep: not those on the decoder (``self``: fixed after start) or on module
    globals (functions and modules); the rest (the arguments, the shapes' relations, global state)."""
    return [not ("self" in entry.name or entry.name.startswith("G[")) for entry in entries]
