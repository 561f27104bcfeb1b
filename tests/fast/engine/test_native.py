"""MedAsk's C++ kernels (app/engine/native, built by `make install`) without a model: the 4-bit kernel
computes GPTQ's dequantized weights times float32 activations for every row tiling, the 4-bit x 8-bit
one the same weights times activations rounded to 8 bits per row and group (exactly that arithmetic,
whatever rows beside it), the 8-bit one int8 weights times the same activations, the float16 one the float16 weights' product; all run inside a compiled
graph; weights off the 4-bit grid and a CPU without the instruction sets are refused with a reason."""

from __future__ import annotations

import gc

import pytest
import torch

from app.engine import kernels, native


def four_bit(out: int, n: int, group: int = 128, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Weights on GPTQ's grid: w = (q - 8) * scale (+ zero) per group of ``group`` inputs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, n), generator=g).float()
    scale = torch.rand(out, n // group, generator=g) * 0.02 + 0.005
    zero = torch.randn(out, n // group, generator=g) * 0.01
    weight = ((q - 8).view(out, -1, group) * scale[..., None] + zero[..., None]).view(out, n)
    return weight, scale, zero


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if native.cpu_lacks():
        pytest.skip(f"this CPU lacks {native.cpu_lacks()}: the native kernels are never candidates here")
    assert native.load() is None, native.load()  # `make install` builds the library


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16])
def test_the_4bit_kernel_computes_the_dequantized_product(rows: int) -> None:
    weight, scale, zero = four_bit(96, 256)
    x = torch.randn(rows, 256)
    got = kernels.Packed("int4-avx2", weight, (scale, zero))(x)
    want = x.double() @ weight.double().t()
    assert got.shape == (rows, 96) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)


def eight_bit_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` rounded as the 4-bit x 8-bit kernel rounds it: per row and group, the largest magnitude on 127."""
    g = x.double().view(x.shape[0], -1, group)
    step = g.abs().amax(-1, keepdim=True) / 127
    return (torch.round(g / step) * step).view_as(x)


@pytest.mark.parametrize(("rows", "group"), [(1, 128), (2, 128), (4, 64), (5, 128), (16, 512)])
def test_the_4bit_8bit_kernel_computes_its_rounded_product(rows: int, group: int) -> None:
    """Activations on 8 bits per row and group (the weights' groups; ggml rounds per 32), integer products,
    the groups' offsets times the exact input sums: equal to that arithmetic done in float64, within
    half a rounding step of the exact product, and a row's result does not depend on its batch-mates."""
    weight, scale, zero = four_bit(96, 512, group)
    x = torch.randn(rows, 512)
    packed = kernels.Packed("int4x8-avx2", weight, (scale, zero))
    got = packed(x).double()
    offset = (zero - 8 * scale).double()  # w = q * scale + offset: only q * scale meets the rounded input
    steps = (weight.double().view(96, -1, group) - offset[..., None]).view(96, 512)
    sums = x.double().view(rows, -1, group).sum(-1)
    want = eight_bit_rows(x, group) @ steps.t() + sums @ offset.t()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    step = x.abs().view(rows, -1, group).amax(-1).double() / 254  # half a step, per row and group
    bound = (step[:, :, None] * weight.abs().double().view(96, -1, group).sum(-1).t()[None]).sum(1)
    assert bool(((got - x.double() @ weight.double().t()).abs() <= bound + 1e-6).all())
    assert torch.equal(packed(x[-1:]), packed(x)[-1:])


@pytest.mark.parametrize(("rows", "inputs"), [(1, 256), (3, 256), (6, 96)])
def test_the_8bit_kernel_computes_its_rounded_product(rows: int, inputs: int) -> None:
    """int8 weights (one scale per output) times 8-bit activations per row and group (128 inputs, or 32
    where 128 does not divide the row): that arithmetic done in float64, whatever rows beside it."""
    weight, x = torch.randn(40, inputs), torch.randn(rows, inputs)
    packed = kernels.Packed("int8-avx2", weight)
    w8, scale = packed.traceable
    assert w8.dtype == torch.int8 and int(w8.abs().max()) == 127
    want = eight_bit_rows(x, kernels.eight_bit_group(inputs)) @ (w8.double() * scale.double()[:, None]).t()
    got = packed(x).double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed(x[:1]), packed(x)[:1])


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_the_float16_kernel_computes_the_float16_weights_product(rows: int) -> None:
    weight, x = torch.randn(80, 64), torch.randn(rows, 64)
    got = kernels.Packed("float16-avx2", weight)(x)
    want = x.double() @ weight.half().double().t()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)


def test_weights_off_the_4bit_grid_are_refused() -> None:
    weight, scale, zero = four_bit(8, 128)
    with pytest.raises(kernels.KernelError, match="not 4-bit values"):
        kernels.int4_groups(weight + 0.003 * torch.randn_like(weight), scale, zero)
    with pytest.raises(kernels.KernelError, match="group scales are needed"):
        kernels.Packed("int4-avx2", weight)


def test_native_kernels_run_inside_a_compiled_graph() -> None:
    weight, scale, zero = four_bit(64, 128)
    packed = kernels.Packed("int4-avx2", weight, (scale, zero))
    rounded = kernels.Packed("int4x8-avx2", weight, (scale, zero))
    head = kernels.Packed("float16-avx2", torch.randn(32, 64))
    head8 = kernels.Packed("int8-avx2", torch.randn(32, 64))

    def net(x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(packed(x)) + rounded(x)
        return head(hidden) + head8(hidden)

    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for rows in (1, 3):
        x = torch.randn(rows, 128)
        with torch.inference_mode():
            assert torch.allclose(compiled(x), net(x), atol=1e-5)


def test_a_cpu_without_avx2_never_loads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "cpu_lacks", lambda: ["avx2", "fma"])
    native.load.cache_clear()
    kernels.available.cache_clear()
    try:
        assert native.load() == "this CPU lacks avx2, fma"
        assert "int4-avx2: this CPU lacks avx2" in (kernels.available("int4-avx2") or "")
    finally:
        native.load.cache_clear()
        kernels.available.cache_clear()
    monkeypatch.undo()
    assert native.load() is None


def test_a_changed_source_is_a_new_library(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A stale build is never loaded: the folder is named by the source's hash."""
    sources = (tmp_path / "kernels.cpp", tmp_path / "attention.cpp")
    for source in sources:
        source.write_text("// one\n")
    monkeypatch.setattr(native, "SOURCES", sources)
    first = native.library_path()
    sources[1].write_text("// two\n")  # either source
    assert native.library_path() != first and native.library_path().name == "medask_native.so"


VNNI_FLAGS = ("avx512_vnni", "avx512vl", "avx512bw")


@pytest.fixture
def vnni() -> None:
    """The VNNI path where this CPU has it (auto again afterwards)."""
    if any(f not in native.reported_flags() for f in VNNI_FLAGS):
        pytest.skip("this CPU lacks AVX-512 VNNI: the 8-bit kernels run their AVX2 path only")
    assert native.integer_dot("auto") == "vnni"
    yield
    native.integer_dot("auto")


@pytest.mark.parametrize(("rows", "group"), [(1, 128), (2, 32), (3, 128), (4, 64), (5, 128), (16, 256)])
def test_vnni_gives_the_avx2_paths_outputs_bit_for_bit(vnni: None, rows: int, group: int) -> None:
    """vpdpbusd sums the same four byte products per int32 lane as maddubs + madd (no saturation is
    reachable), and the float arithmetic after it is shared: equal outputs, not merely close. Extremes
    included: activations whose largest magnitude rounds to +-127, weights of -127, 0 and 127, 4-bit 0 and 15."""
    weight, scale, zero = four_bit(80, 512, group, seed=rows)
    weight[0, :group] = zero[0, 0] + 7 * scale[0, 0]  # every 4-bit value 15 in a group
    x = torch.randn(rows, 512) * torch.logspace(-3, 2, rows)[:, None]
    x[0, 5] = -x[0].abs().max() * 2  # a group whose largest magnitude is negative: -127 after rounding
    dense = torch.randn(48, 512)
    dense[1] = 0.0
    dense[2, ::2] = -dense[2].abs().max()  # -127
    packed = (kernels.Packed("int4x8-avx2", weight, (scale, zero)), kernels.Packed("int8-avx2", dense))
    on = [p(x) for p in packed]
    assert native.integer_dot("avx2") == "avx2"
    off = [p(x) for p in packed]
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)


def test_the_integer_dot_is_named_and_a_forced_vnni_that_cannot_run_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="integer dot 'sse': one of auto, vnni, avx2"):
        native.integer_dot("sse")
    has_vnni = all(f in native.reported_flags() for f in VNNI_FLAGS)
    assert native.integer_dot("auto") == ("vnni" if has_vnni else "avx2")
    assert native.integer_dot("avx2") == "avx2"
    if not has_vnni:  # the AVX2-only machines: forced, it is a start-up error with the reason
        with pytest.raises(ValueError, match="this CPU lacks AVX-512 VNNI"):
            native.integer_dot("vnni")
    native.integer_dot("auto")
    monkeypatch.setattr(native, "load", lambda: "this CPU lacks avx2")
    assert native.integer_dot("auto") is None  # no library: nothing to choose, /info says null
    with pytest.raises(ValueError, match="integer dot vnni: MedAsk's kernels are unavailable"):
        native.integer_dot("vnni")


@pytest.mark.parametrize(("rows", "inputs"), [(1, 512), (2, 64), (5, 100), (16, 512), (37, 1536), (210, 512)])
def test_int8_in_cpp_gives_the_python_path_outputs_bit_for_bit(rows: int, inputs: int) -> None:
    """FBGEMM's int8 GEMM with per-row scales, in C++ (fbgemm_rows.cpp): every row's largest magnitude, the
    row divided by it, the [-1, 1] row beside them, FBGEMM's product, times the scale again: the same floats
    as the Python path (kernels._int8_rows) for any row count and width (vector tails included), zero rows,
    huge and tiny magnitudes."""
    g = torch.Generator().manual_seed(rows * 1000 + inputs)
    weight = torch.randn(96, inputs, generator=g)
    x = torch.randn(rows, inputs, generator=g) * torch.logspace(-6, 6, rows)[:, None]
    x[0, : inputs // 2] = 0.0
    if rows > 1:
        x[1] = 0.0  # a zero row: its scale is the floor, its outputs zero
    packed = kernels.Packed("int8", weight)
    assert packed.native >= 0  # the library is loaded: the C++ path serves int8
    got = packed(x)
    assert torch.equal(got, kernels._int8_rows(x, kernels._pack("int8", weight)))
    assert got.shape == (rows, 96) and got.dtype == torch.float32


def test_int8_in_cpp_runs_inside_a_compiled_graph_and_frees_its_weight() -> None:
    held = {"w": kernels.Packed("int8", torch.randn(48, 64))}

    def net(x: torch.Tensor) -> torch.Tensor:
        return held["w"](torch.relu(x)) * 2

    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for rows in (1, 7):
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            assert torch.equal(compiled(x), net(x))
    index = held["w"].native
    held.clear()
    torch._dynamo.reset()  # compiled code may keep what it traced
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no packed weight {index}"):
        torch.ops.medask_native.int8_rows(torch.randn(1, 64), index, 48)


def test_int8_without_the_library_keeps_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "load", lambda: "not built")
    weight, x = torch.randn(16, 64), torch.randn(3, 64)
    packed = kernels.Packed("int8", weight)
    assert packed.native == -1 and packed.index >= 0
    assert torch.equal(packed(x), kernels._int8_rows(x, kernels._pack("int8", weight)))
