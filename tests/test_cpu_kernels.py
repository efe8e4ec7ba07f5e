"""The AVX-512 int8 and int4 kernels (aquila/inference/cpu_kernels.py): exact against float64 where they build, used
by Int8Linear (packed at load; up to MAX_ROWS rows, longer prompts through unpacked blocks) and by Int4Linear for all
inputs, and torch's kernels with one log line where they are switched off."""

import logging

import pytest
import torch

from aquila.inference import cpu_kernels
from aquila.inference.cpu_kernels import pack_pairs, pack_rows, unpack_rows
from aquila.inference.int4 import Int4Linear, dequantize_int4
from aquila.inference.quantize import Int8Linear


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def available(bits: int):
    getters = {8: cpu_kernels.int8_packed_kernel, 4: cpu_kernels.int4_rows_kernel, 32: cpu_kernels.f32_packed_kernel}
    fn, name = getters[bits](), cpu_kernels._label(bits)
    if fn is None:
        why = cpu_kernels._why_not(bits) or cpu_kernels._build_error or "it differs from float64 (see the log line)"
        print(f"SKIPPED: the {name} kernel is not available here: {why}")
        pytest.skip(f"the {name} kernel is not available here: {why}")
    return fn


@pytest.fixture
def kernel():
    return available(8)


@pytest.fixture
def kernel4():
    return available(4)


def test_packing_keeps_every_row_and_pads_with_zeros():
    w = torch.randint(-127, 128, (7, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(9))
    packed = pack_rows(w)
    assert packed.shape == (2, 2, 4, 64) and torch.equal(packed[1, 0, 2], w[6, :64])  # row 6, columns 0..63
    assert torch.equal(unpack_rows(packed, 7), w) and not packed[1, :, 3].any()  # a zero padding row
    assert torch.equal(unpack_rows(packed[1:], 3), w[4:])  # a slice of blocks: its own rows
    narrow = pack_rows(w[:, :100])  # zero bytes after the last column
    assert narrow.shape == (2, 2, 4, 64) and not narrow[:, 1, :, 36:].any()
    assert torch.equal(unpack_rows(narrow, 7, 100), w[:, :100])


@pytest.mark.parametrize(
    "m,n,k", [(1, 2048, 2048), (1, 70, 192), (2, 5, 64), (4, 16008 // 8, 256), (7, 9, 128), (8, 6, 64), (13, 7, 128)]
)
def test_kernel_equals_a_float64_product(kernel, m, n, k):
    """One row (decode), several (batched decode, a short prompt: 1-4 rows 4 weight rows at a time, 5-8 two at a
    time, then the next 8), row tails (padding); each row the same bits alone as in its batch."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    s = torch.rand(n, generator=gen) / 100
    ref = x.double() @ (w.double() * s.double()[:, None]).t()
    got = kernel(x, pack_rows(w), s, n)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert rel_err(got, ref) < 1e-6
    assert all(torch.equal(kernel(x[i : i + 1], pack_rows(w), s, n), got[i : i + 1]) for i in (0, m - 1))


@pytest.mark.parametrize("m,n,k", [(1, 2048, 2048), (1, 70, 16), (5, 9, 160), (64, 33, 64)])
def test_fp32_kernel_equals_a_float64_product(m, n, k):
    kernel = available(32)
    gen = torch.Generator().manual_seed(m + n + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    packed = pack_rows(w)
    assert packed.shape == (-(-n // 4), k // 16, 4, 16)
    ref = x.double() @ w.double().t()
    assert rel_err(kernel(x, packed, n), ref) < 1e-6
    assert rel_err(cpu_kernels.gemm_by_blocks(x, packed, n), ref) < 1e-6  # the long-prompt path, same layout
    assert torch.equal(kernel(x[-1:], packed, n), kernel(x, packed, n)[-1:])  # a row does not depend on its batch


def test_int8_linear_packs_at_prepare_and_is_exact_for_every_row_count(kernel, monkeypatch):
    layer = Int8Linear.from_weight(torch.randn(1030, 128, generator=torch.Generator().manual_seed(0)))
    dequantized_w = layer.weight.float() * layer.scales[:, None]
    layer.prepare_for_cpu()
    assert (
        layer.packed
        and layer.weight.shape == (258, 2, 4, 64)
        and (layer.in_features, layer.out_features) == (128, 1030)
    )
    calls = []
    monkeypatch.setitem(cpu_kernels._kernels, 8, lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    x = torch.randn(2, 50, 128, generator=torch.Generator().manual_seed(1))  # 100 rows: a prompt past MAX_ROWS
    with torch.no_grad():
        ref = x.double() @ dequantized_w.double().t()
        one, prompt = layer(x[:1, :1]), layer(x)
    assert calls == [1]  # the 100-row prompt went through unpacked blocks (1030 rows: 5 blocks, the last short)
    assert rel_err(one, ref[:1, :1]) < 1e-6 and rel_err(prompt, ref) < 1e-6  # fp32 both ways
    assert prompt.shape == (2, 50, 1030)


def test_a_packed_int8_linear_still_runs_off_cpu(kernel):
    """A CPU-loaded model moved elsewhere (the model card's .cuda()) reads the packed rows back; on CPU that path is
    the meta device's: shapes only."""
    layer = Int8Linear.from_weight(torch.randn(6, 64, generator=torch.Generator().manual_seed(0)))
    plain = layer.weight.clone()
    layer.prepare_for_cpu()
    layer.scales = layer.scales.to("meta")
    assert layer(torch.empty(3, 64, device="meta")).shape == (3, 6)
    assert torch.equal(unpack_rows(layer.weight, 6), plain)


def test_int8_linear_of_other_widths_keeps_torch_kernel(kernel):
    layer = Int8Linear.from_weight(torch.randn(16, 96, generator=torch.Generator().manual_seed(0)))
    layer.prepare_for_cpu()
    assert not layer.packed and layer.weight.shape == (16, 96)


def test_switched_off_it_says_so_and_torch_kernel_runs(monkeypatch, caplog):
    monkeypatch.setenv("AQUILA_INT8_KERNEL", "0")
    monkeypatch.setattr(cpu_kernels, "_kernels", {})
    with caplog.at_level(logging.INFO, logger="aquila.inference.cpu_kernels"):
        assert cpu_kernels.int8_packed_kernel() is None
    assert [r.getMessage() for r in caplog.records] == ["int8 decode uses torch's kernel: AQUILA_INT8_KERNEL=0"]
    layer = Int8Linear.from_weight(torch.randn(8, 64, generator=torch.Generator().manual_seed(2)))
    layer.prepare_for_cpu()
    assert not layer.packed
    x = torch.randn(1, 64)
    with torch.no_grad():
        expected = x @ (layer.weight.float() * layer.scales[:, None]).t()
        assert rel_err(layer(x), expected) < 1e-2


@pytest.mark.parametrize(
    "m,n,k,group",
    [(1, 2048, 2048, 64), (1, 70, 256, 32), (1, 3, 512, 256), (1, 5, 384, 128), (1, 6, 192, 64), (2, 5, 128, 64),
     (4, 66, 384, 128), (9, 7, 64, 32)],
)  # fmt: skip
@pytest.mark.parametrize("int8_x", [False, True])
def test_int4_kernel_equals_a_float64_product(kernel4, m, n, k, group, int8_x):
    """One row (the decode path; with int8_x, int8 activations through VNNI) and several (four at a time, padded),
    row tails (padding rows of the packed layout), widths that pad the last 64 bytes, every group size; exact to fp32
    against `int4_reference`."""
    gen = torch.Generator().manual_seed(n + k + m)
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    pairs = (torch.randn(n, k // group, 2, generator=gen) / 50).bfloat16()
    got = kernel4(x, pack_rows(w), pack_pairs(pairs.view(torch.int32).squeeze(-1)), group, n, int8_x)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert rel_err(got, cpu_kernels.int4_reference(x, w, pairs, int8_x)) < 1e-5  # fp32 sums
    exact = x.double() @ dequantize_int4(w, pairs).double().t()
    # int8 activations: x off by up to half a step (max|x| / 254 per group), as llama.cpp's q8_0; a few-term sum of
    # random codes (k = 512, groups of 256 here) is where that shows most
    assert rel_err(got, exact) < (5e-2 if int8_x else 1e-5)


def test_int8_activations_are_what_the_reference_rounds(kernel4):
    """The int8 path really rounds x (not a silent fp32 fallback where VNNI is present) and the reference knows it."""
    from aquila.inference.cpu_kernels import rounded_activations

    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(7))
    w = torch.randint(0, 256, (8, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    pairs = torch.tensor([1.0, 0.0]).bfloat16().expand(8, 4, 2).contiguous()
    w, sz = pack_rows(w), pairs.view(torch.int32).squeeze(-1)
    fp32, int8 = kernel4(x, w, sz, 64, 8, False), kernel4(x, w, sz, 64, 8, True)
    xr = rounded_activations(x, 64)
    assert 0 < (xr - x).abs().max() <= x.abs().max() / 254 + 1e-6
    rounded = kernel4(xr, w, sz, 64, 8, False)  # the rounded x, multiplied in fp32
    if cpu_kernels._built().has_vnni():
        assert rel_err(int8, rounded) < 1e-5 and rel_err(int8, fp32) > 1e-4
    else:
        assert torch.equal(int8, fp32)


def test_int4_linear_runs_on_it_with_the_file_codes_packed(kernel4):
    w = torch.randn(46, 256, generator=torch.Generator().manual_seed(3))
    layer = Int4Linear.from_weight(w, 64)
    codes, dequantized = layer.weight.clone(), dequantize_int4(layer.weight, layer.scales)
    layer.prepare_for_cpu()
    assert layer.own_kernel and torch.equal(unpack_rows(layer.weight, 46), codes)  # the same bytes, packed
    assert layer.scales.shape == (48, 4)  # the pairs as int32, two zero rows to the packed blocks' 48
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = x.double() @ dequantized.double().t()
        assert rel_err(layer(x), ref) < 1e-6 and rel_err(layer(x[:, :1]), ref[:, :1]) < 1e-6
        assert layer.half()(x.half()).dtype == torch.float16  # the pairs are int32: .half() leaves them alone


def test_int4_switched_off_uses_torch_kernel_and_says_so(monkeypatch, caplog):
    monkeypatch.setenv("AQUILA_INT4_KERNEL", "0")
    monkeypatch.setattr(cpu_kernels, "_kernels", {})
    with caplog.at_level(logging.INFO, logger="aquila.inference.cpu_kernels"):
        layer = Int4Linear.from_weight(torch.randn(32, 128, generator=torch.Generator().manual_seed(5)), 32)
        dequantized = dequantize_int4(layer.weight, layer.scales)
        layer.prepare_for_cpu()
    assert [r.getMessage() for r in caplog.records] == ["int4 decode uses torch's kernel: AQUILA_INT4_KERNEL=0"]
    assert layer.prepared and not layer.own_kernel
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(layer(x), x @ dequantized.t()) < 1e-2  # torch's kernel: bf16 activations


def test_the_kernels_build_wherever_they_can():
    """Where torch dispatches AVX-512 and a compiler is on PATH, a source that does not compile is a failure here,
    not a silent fallback to torch's kernels (the kernel tests above would only skip)."""
    why = cpu_kernels._why_not_build()
    if why is not None:
        print(f"SKIPPED: the kernels are not built here: {why}")
        pytest.skip(f"the kernels are not built here: {why}")
    assert cpu_kernels._built() is not None, cpu_kernels._build_error
