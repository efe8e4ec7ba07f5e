"""Linear weights packed once for fp32 decoding on CPU: for our AVX-512 kernel, else into oneDNN's blocked layout.

Where our kernel built (`cpu_kernels.f32_packed_mm`: four rows' 64-byte pieces side by side, one sequential stream
a thread), a layer whose width is a multiple of 16 is packed for it, whatever the row count: it reads the weights
at memory speed for 1 to 64 rows (MKL's matrix-vector product read them at 15 GB/s on a 2-core AMD EPYC, the
packed loop at 29-31 of a 33 GB/s probe), and a longer prompt unpacks blocks for MKL's GEMM. Elsewhere oneDNN:

A plain `nn.Linear` on CPU hands its [out, in] weight to a GEMM that repacks it into the kernel's blocked layout
on every call. For the few rows of a decode step that repack is an extra read and write of every weight: on the
medium model (dim 512, vocab 100,008) a 4-row step costs about 2x a 1-row step and a 16-row step about 3x, although
all of them read the same weights once. Packing at load time (what inductor's "freezing" does for compiled
graphs) leaves one read per step: 16 rows then cost about 1.6x one row, which is what continuous batching needs.
A single row (a matrix-vector product, which never repacked) runs 10-20% slower packed by oneDNN, so without our
kernel the CLI packs only where several rows decode together (`options.load_predictor`, `should_pack`).

A packed layer's output for a row does not depend on the other rows of its batch (tested), which a plain GEMM does
not promise; it differs from `nn.Linear`'s in the last bits (another summation order).

Inference only: a packed layer has no gradient, its weight is an opaque oneDNN tensor (not in the state dict),
and it computes in float32 on CPU. Pack after loading, merging and quantizing, and before decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from aquila.errors import AquilaError
from aquila.inference.cpu_kernels import PACK_BYTES, f32_packed_kernel, pack_rows, packed_mm

# The row count oneDNN picks its blocking for; any other count works (1-row steps run as fast as unpacked).
BATCH_HINT = 16


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`y = x W^T (+ b)` with W packed once; x [..., in_features] fp32 on CPU."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise AquilaError(f"PackedLinear needs a float32 CPU weight, got {weight.dtype} on {weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.own_kernel = own_packing(self.in_features)
        if self.own_kernel:
            self.packed = pack_rows(weight)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise AquilaError(f"packed linear layers compute in float32; got {x.dtype} input (pack after .half())")
        rows = x.reshape(-1, self.in_features)
        if not self.own_kernel:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
        y = packed_mm(rows.contiguous(), self.packed, self.out_features)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def own_packing(in_features: int) -> bool:
    """Whether a layer this wide is packed for our kernel (built here, a width of whole 64-byte pieces)."""
    return in_features % (PACK_BYTES // 4) == 0 and f32_packed_kernel() is not None


def should_pack(model: nn.Module, rows: int) -> bool:
    """What the CLI does for `rows` sequences decoding together: pack where our kernel serves (any rows), or where
    oneDNN's packing pays (several rows)."""
    if not can_pack(model):
        return False
    return rows > 1 or all(own_packing(m.in_features) for m in model.modules() if type(m) is nn.Linear)


def can_pack(model: nn.Module) -> bool:
    """True when packing applies: oneDNN present and every plain linear holds a float32 CPU weight."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    return (
        packing_available()
        and bool(linears)
        and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linears)
    )


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` of `model` by a `PackedLinear`, in place; returns how many.

    Subclasses of nn.Linear and other layers (int8, LoRA) are left alone. The fp32 weights are released as each
    layer is packed, so memory stays at about one copy of the weights.
    """
    if not packing_available():
        raise AquilaError("this torch build has no oneDNN (mkldnn): linear layers cannot be packed")
    # (parent, name) only: a list of the modules themselves would keep every fp32 weight alive until the end
    # (a 1B model's load peaked at twice its weights)
    targets = [(p, name) for p in model.modules() for name, child in p.named_children() if type(child) is nn.Linear]
    for parent, name in targets:
        setattr(parent, name, PackedLinear(getattr(parent, name)))
    return len(targets)
