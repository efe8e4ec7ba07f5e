"""Mixed precision on the CPU: the rotary with half-precision tables, and the fsdp backend's FSDP2
MixedPrecisionPolicy (bf16 parameters in forward/backward, fp32 sharded master weights and gradient reduction)."""

from __future__ import annotations

import pytest
import torch

from aquila.model.aquila_model import apply_rotary, rotary_tables


@pytest.mark.parametrize("compiled_route", [False, True], ids=["eager-complex", "compiled-real"])
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_rotary_with_half_precision_tables(monkeypatch, compiled_route, table_dtype, x_dtype):
    """Half-precision cos/sin (what FSDP2's cast_forward_inputs makes of them) rotate in fp32: the result equals
    the fp32 computation on the same table values, cast to x's dtype."""
    if compiled_route:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the route torch.compile traces
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 16, generator=gen).to(x_dtype).requires_grad_()
    cos, sin = rotary_tables(torch.arange(6).expand(2, 6) * 300, 16, 10000.0)  # positions up to 1500
    hcos, hsin = cos.to(table_dtype), sin.to(table_dtype)
    out = apply_rotary(x, hcos, hsin)
    assert out.dtype == x_dtype
    ref = apply_rotary(x.detach().float(), hcos.float(), hsin.float()).to(x_dtype)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # Against the unrounded fp32 tables: each output element is x0*cos -/+ x1*sin, so rounding the tables (2^-9
    # relative for bf16, 2^-11 for fp16) and the output (x's dtype) moves it by at most this much.
    eps = torch.finfo(table_dtype).eps / 2 * 2 * float(x.detach().abs().max())
    out_eps = 0.0 if x_dtype == torch.float32 else torch.finfo(x_dtype).eps * float(x.detach().abs().max())
    full = apply_rotary(x.detach().float(), cos, sin)
    torch.testing.assert_close(out.float(), full, atol=eps + out_eps + 1e-6, rtol=0)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert grad.dtype == x_dtype and torch.isfinite(grad).all()
