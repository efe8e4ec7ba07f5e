"""The AVX-512 int8 decode kernel (aquila/inference/int8_kernel.py): exact against float64 where it builds, used by
Int8Linear for decode-sized inputs only, and torch's kernel with one log line where it is switched off."""

import logging

import pytest
import torch

from aquila.inference import int8_kernel
from aquila.inference.quantize import Int8Linear


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture
def kernel():
    fn = int8_kernel.int8_rows_kernel()
    if fn is None:
        why = int8_kernel._why_not() or "it did not build (see the log line)"
        print(f"SKIPPED: the int8 kernel is not available here: {why}")
        pytest.skip(f"the int8 kernel is not available here: {why}")
    return fn


@pytest.mark.parametrize("m,n,k", [(1, 2048, 2048), (1, 70, 200), (2, 5, 33), (4, 16008 // 8, 256), (3, 7, 16)])
def test_kernel_equals_a_float64_product(kernel, m, n, k):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    s = torch.rand(n, generator=gen) / 100
    ref = x.double() @ (w.double() * s.double()[:, None]).t()
    got = kernel(x, w, s)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert rel_err(got, ref) < 1e-6


def test_int8_linear_uses_it_for_decode_rows_only(kernel, monkeypatch):
    layer = Int8Linear.from_weight(torch.randn(96, 64, generator=torch.Generator().manual_seed(0)))
    calls = []
    monkeypatch.setattr(int8_kernel, "_kernel", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dequantized = x @ (layer.weight.float() * layer.scales[:, None]).t()
        small, large = layer(x[:4]), layer(x)
    assert calls == [4]  # 8 rows (a prompt) went to torch's kernel
    assert rel_err(small, dequantized[:4]) < 1e-6  # fp32 activations: exact to fp32
    assert rel_err(large, dequantized) < 1e-2  # torch's kernel: bf16 activations


def test_switched_off_it_says_so_and_torch_kernel_runs(monkeypatch, caplog):
    monkeypatch.setenv("AQUILA_INT8_KERNEL", "0")
    monkeypatch.setattr(int8_kernel, "_tried", False)
    monkeypatch.setattr(int8_kernel, "_kernel", None)
    with caplog.at_level(logging.INFO, logger="aquila.inference.int8_kernel"):
        assert int8_kernel.int8_rows_kernel() is None
    assert [r.getMessage() for r in caplog.records] == ["int8 decode uses torch's kernel: AQUILA_INT8_KERNEL=0"]
    layer = Int8Linear.from_weight(torch.randn(8, 32, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(1, 32)
    with torch.no_grad():
        expected = x @ (layer.weight.float() * layer.scales[:, None]).t()
        assert rel_err(layer(x), expected) < 1e-2
