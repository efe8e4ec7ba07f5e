"""int4 weight-only linear layers: group-wise asymmetric 4-bit weights, run by our AVX-512 kernel or torch's.

Each group of `group_size` consecutive input weights of an output row has a scale and a zero point (bf16), and
    w ~= (q - 8) * scale + zero,  q in 0..15,
which is the dequantization torch.ops.aten._weight_int4pack_mm_for_cpu computes. With group 64 that is 4.5 bits a
weight, the same bytes as llama.cpp's q4_0 (which has a scale but no zero point per 32 weights).

On disk (`aquila quantize --bits 4`) a layer is `*.weight` uint8 [out, in / 2], two weights a byte in plain row
order (low nibble first), and `*.scales` bf16 [out, in / group, 2] holding (scale, zero). That layout is portable;
the kernel's own packing is blocked for the CPU it runs on, so it is made at load time (`prepare_for_cpu`), in
row blocks, replacing the plain tensors (the layer then costs its own bytes once). Where our AVX-512 kernel
(`cpu_kernels.int4_rows_mm`; a ~1B model decodes 1.6x faster on it than on torch's) built, the file's code bytes are
packed four rows at a time (`cpu_kernels.pack_rows`, as int8's) and the pairs kept as int32. A prepared layer is for
inference only: its buffers are in the kernel's layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aquila.errors import AquilaError
from aquila.inference.cpu_kernels import int4_rows_kernel, pack_pairs, pack_rows

GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel accepts
DEFAULT_GROUP_SIZE = 64
_ROW_ALIGN = 16  # the kernel's packing needs a row count divisible by 16 (the 16,008-row output matrix is padded)
_BLOCK_ROWS = 1024  # rows converted at a time: a multiple of the kernel's row blocking, so blocks concatenate


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise AquilaError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise AquilaError(
            f"{name}: {in_features} input features are not a multiple of the int4 group size {group_size}"
        )


def quantize_weight_int4(
    w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, block_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit: (packed uint8 [out, in/2], scales bf16 [out, in/group, 2] = (scale, zero)).

    Scale and zero are rounded to bf16 first and the codes chosen against the rounded values, so the weights
    the kernel reconstructs are the nearest codes to `w` for the scales it actually uses.
    """
    rows, cols = w.shape
    check_group_size(cols, group_size)
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows, cols // group_size, 2, dtype=torch.bfloat16, device=w.device)
    for start in range(0, rows, block_rows):
        block = w[start : start + block_rows].float().reshape(-1, cols // group_size, group_size)
        low, high = torch.aminmax(block, dim=-1)
        scale = ((high - low) / 15.0).clamp_(min=1e-10).bfloat16()
        zero = (low + 8.0 * scale.float()).bfloat16()
        q = ((block - zero.float()[..., None]) / scale.float()[..., None] + 8.0).round_().clamp_(0, 15)
        q = q.to(torch.uint8).reshape(q.shape[0], cols)
        packed[start : start + block_rows] = q[:, 0::2] | (q[:, 1::2] << 4)
        scales[start : start + block_rows] = torch.stack([scale, zero], dim=-1)
    return packed, scales


def unpack_codes(packed: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """uint8 [out, in/2] (low nibble first) -> codes [out, in] (0..15) of `dtype`."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return codes if dtype == torch.uint8 else codes.to(dtype)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] that (packed, scales) stand for."""
    q = unpack_codes(packed).float()
    group = q.shape[1] // scales.shape[1]
    s = scales.float().repeat_interleave(group, dim=1)
    return (q - 8.0) * s[..., 0] + s[..., 1]


# torch's packing for the CPU kernel (`_convert_weight_to_int4pack_for_cpu`) takes int32 codes, eight times the
# file's bytes, and its layout depends on the instruction set torch dispatches to. For AVX-512 it is, per block of
# 64 output rows and per input column k, 32 bytes: rows d and d+32 share byte d, rows d+16 and d+48 byte 16+d
# (low nibble first); a last block of 16, 32 or 48 rows pairs neighbouring rows. `_pack_avx512` makes the same
# bytes from uint8 codes with a few tensor ops, 3-4x faster than the kernel's packing over a whole model (most of
# an int4 load). It is used only where it gives the kernel's own bytes in this process (`kernel_packer` checks
# once on a small matrix); elsewhere the kernel packs.
def _pairs(codes: torch.Tensor) -> torch.Tensor:
    """codes [n, K] -> [K, n/2]: rows 2i (low nibble) and 2i+1 (high nibble) share a byte."""
    return (codes[0::2] | (codes[1::2] << 4)).t()


def _pack_avx512(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, K] (n a multiple of 16, from a 64-row block boundary) -> the kernel's uint8 [n, K/2]."""
    n, k = codes.shape
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    full = n // 64 * 64
    if full:
        blocks = codes[:full].view(-1, 4, 16, k)  # rows d, d+16, d+32, d+48 of each block
        out[:full].view(-1, k, 2, 16).copy_((blocks[:, 0:2] | (blocks[:, 2:4] << 4)).permute(0, 3, 1, 2))
    if full < n:
        out[full:].view(k, (n - full) // 2).copy_(_pairs(codes[full:]))
    return out


def _pack_by_kernel(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


@functools.cache
def kernel_packer() -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 codes [n, K] -> the CPU kernel's layout: `_pack_avx512` where it matches the kernel's own packing
    (checked on 112 x 128 random codes: one full block and a 48-row one), else the kernel's packing."""
    codes = torch.randint(0, 16, (112, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return _pack_avx512 if torch.equal(_pack_avx512(codes), _pack_by_kernel(codes)) else _pack_by_kernel


def _int4_mm(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor, out_features: int) -> torch.Tensor:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), w, group, sz)
    return y[:, :out_features].to(x.dtype)


# Opaque under torch.compile, as int8's kernel is (see quantize.int8_mm_op).
@torch.library.custom_op("aquila::int4_mm", mutates_args=())
def int4_mm_op(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor, out_features: int) -> torch.Tensor:
    return _int4_mm(x, w, group, sz, out_features)


@int4_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("aquila::int4_rows_mm", mutates_args=())
def int4_rows_mm_op(
    x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group: int, n: int, int8_x: bool
) -> torch.Tensor:
    return int4_rows_kernel()(x, w, sz, group, n, int8_x)


@int4_rows_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group: int, n: int, int8_x: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


class Int4Linear(nn.Module):
    """y = x @ W^T with W in group-wise int4 (see the module docstring for the two layouts)."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.prepared = self.own_kernel = False
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("scales", torch.empty(out_features, groups, 2, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        module = cls(*w.shape, group_size=group_size, device=w.device)
        if not w.is_meta:
            module.weight, module.scales = quantize_weight_int4(w, group_size)
        return module

    def prepare_for_cpu(self) -> None:
        """Replace the file layout by the CPU kernel's, in row blocks (the codes of one block at a time).

        The kernel's (scale, zero) tensor [in/group, rows, 2] bf16 is kept as its int16 bit pattern, so that a
        later `.half()` or `.float()` on the model (integer buffers are left alone) cannot change it."""
        if self.prepared:
            return
        if self.weight.device.type != "cpu":
            raise AquilaError(f"the int4 CPU kernel needs CPU weights, got {self.weight.device}")
        if int4_rows_kernel() is not None:  # the pairs as int32 survive a later .half()
            self.weight = pack_rows(self.weight)
            self.scales = pack_pairs(self.scales.contiguous().view(torch.int32).squeeze(-1))
            self.prepared = self.own_kernel = True
            return
        rows = -(-self.out_features // _ROW_ALIGN) * _ROW_ALIGN
        # The kernel's layout keeps rows in their blocks, so block by block it can overwrite the file layout in
        # place (no second copy of the layer); a padded matrix (the output) needs a new, slightly larger tensor.
        packed = (
            self.weight if rows == self.out_features else torch.empty(rows, self.in_features // 2, dtype=torch.uint8)
        )
        pack = kernel_packer()
        for start in range(0, rows, _BLOCK_ROWS):
            stop = min(start + _BLOCK_ROWS, rows)
            real = self.weight[start : min(stop, self.out_features)]
            codes = unpack_codes(real, torch.uint8)
            if real.shape[0] < stop - start:  # padding rows: code 8, weight = zero point = 0
                codes = torch.cat([codes, codes.new_full((stop - start - real.shape[0], self.in_features), 8)])
            packed[start:stop] = pack(codes)
            del codes, real
        sz = torch.zeros(self.in_features // self.group_size, rows, 2, dtype=torch.bfloat16)
        sz[:, : self.out_features] = self.scales.to(torch.bfloat16).transpose(0, 1)
        self.weight, self.scales = packed, sz.view(torch.int16)
        self.prepared = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.own_kernel and x.device.type == "cpu":
            mm = int4_rows_mm_op if torch.compiler.is_compiling() else int4_rows_kernel()
            y = mm(rows.float().contiguous(), self.weight, self.scales, self.group_size, self.out_features, True)
            y = y.to(x.dtype)
        elif self.prepared and x.device.type == "cpu":
            mm = int4_mm_op if torch.compiler.is_compiling() else _int4_mm
            y = mm(rows, self.weight, self.group_size, self.scales.view(torch.bfloat16), self.out_features)
        elif self.prepared:
            raise AquilaError("this int4 layer is in the CPU kernel's layout; load the model again for another device")
        else:
            y = F.linear(rows, dequantize_int4(self.weight, self.scales).to(device=x.device, dtype=x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int4, group={self.group_size}"


def prepare_int4(model: nn.Module) -> nn.Module:
    """Put every Int4Linear of a CPU model into the kernel's layout (once, after loading)."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.prepare_for_cpu()
    return model
