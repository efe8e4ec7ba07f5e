"""int8 and int4 weight-only quantization, applied from outside the model (BMInf's idea, without its CUDA kernels).

Every `nn.Linear` becomes an `Int8Linear` (int8 weight [out, in] + one fp32 scale per output channel, symmetric,
scale = max|row| / 127) and, optionally, the token embedding an `Int8Embedding` (one scale per row). Norms stay
in floating point. On CPU the matmul is our AVX-512 kernel for decode steps (`cpu_kernels.py`, built on first
use) and `torch._weight_int8pack_mm` with bf16 activations otherwise; elsewhere the weight is dequantized on the
fly.

int4 (`--bits 4`, `int4.py`) makes every `nn.Linear` an `Int4Linear` (group-wise scale and zero point; our AVX-512
kernel in `cpu_kernels.py`, else torch's `_weight_int4pack_mm_for_cpu`); the embedding, read one row a token, stays
int8 (`Int8Embedding`).

A quantized directory holds config.json, `model.safetensors` (int8 `*.weight` + fp32 `*.scales`, or int4 packed
`*.weight` + bf16 `*.scales`), the tokenizer files, and `quantization.json` ({"format": "aquila-int8" or
"aquila-int4", ...}), which is what marks it as quantized. It is loaded strictly and read tensor by tensor into
fresh aligned memory (`tensor_file.py`), so the loaded model costs its own bytes (no resident file mapping, no
aligned second copy).

    aquila quantize SRC_MODEL_DIR DST_DIR [--bits 8|4] [--group-size 64] [--keep-embeddings]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from aquila.checkpoint import (
    QUANT_CONFIG,
    SAFETENSORS_NAME,
    ModelDir,
    check_destination,
    check_state_dict,
    load_into,
    meta_model,
    progress,
    write_model_dir,
)
from aquila.cli_help import HelpFormatter
from aquila.errors import AquilaError
from aquila.inference.cpu_kernels import PACK_BYTES, int8_packed_kernel, pack_rows, packed_mm, unpack_rows
from aquila.inference.int4 import DEFAULT_GROUP_SIZE, Int4Linear, check_group_size, prepare_int4, quantize_weight_int4
from aquila.inference.tensor_file import iter_safetensors, release_freed_memory, tensor_count
from aquila.io_utils import read_json

QUANT_FORMAT = "aquila-int8"
QUANT_FORMATS = {8: QUANT_FORMAT, 4: "aquila-int4"}


def quantize_weight(w: torch.Tensor, block_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [out, in], scales fp32 [out]) with w ~= q * scales[:, None].

    Rows are processed in blocks so the fp32 temporaries stay small whatever the size of `w`.
    """
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], block_rows):
        block = w[start : start + block_rows].float()
        low, high = torch.aminmax(block, dim=1)
        s = (torch.maximum(-low, high) / 127.0).clamp_(min=1e-10)
        q[start : start + block_rows] = torch.div(block, s[:, None]).round_().clamp_(-127, 127)
        scales[start : start + block_rows] = s
    return q, scales


def _int8_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [m, k] (any float) @ int8 w [n, k] with per-row scales -> [m, n] in x's dtype, by torch's kernel (bf16
    inputs): where ours is not built, or the layer's width is not a multiple of its 64-byte pieces."""
    return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w, scales.to(torch.bfloat16)).to(x.dtype)


def _int8_packed_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """x [m, k] @ the packed int8 w (`pack_rows`) with per-row scales -> [m, n], exact to fp32: up to MAX_ROWS rows
    our kernel; a longer prompt unpacks blocks of rows to fp32 for MKL's GEMM (faster there from ~64 rows)."""
    return packed_mm(x.float().contiguous(), w, n, scales.float().contiguous()).to(x.dtype)


# Under torch.compile the kernels are called as opaque ops: inductor's own lowering of _weight_int8pack_mm fails
# when its input is a fused pointwise result (LoweringException in torch 2.13).
@torch.library.custom_op("aquila::int8_mm", mutates_args=())
def int8_mm_op(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _int8_mm(x, w, scales)


@int8_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("aquila::int8_packed_mm", mutates_args=())
def int8_packed_mm_op(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    return _int8_packed_mm(x, w, scales, n)


@int8_packed_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


class Int8Rows(nn.Module):
    """An int8 matrix [rows, cols] with one fp32 scale per row: what Int8Linear and Int8Embedding share."""

    def __init__(self, rows: int, cols: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(rows, cols, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(rows, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> Int8Rows:
        module = cls(*w.shape, device=w.device)
        if not w.is_meta:
            module.weight, module.scales = quantize_weight(w)
        return module

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, int8"


class Int8Linear(Int8Rows):
    """y = x @ (q * scales)^T. `weight` is [out, in] as in the file until `prepare_for_cpu` (after a CPU load)
    packs it into our kernel's layout (`pack_rows`; `packed` then)."""

    def __init__(self, rows: int, cols: int, device: torch.device | str | None = None) -> None:
        super().__init__(rows, cols, device)
        self.out_features, self.in_features, self.packed = rows, cols, False

    def prepare_for_cpu(self) -> None:
        """Pack the weight for our kernel where it is built (and the width is a multiple of its 64-byte pieces),
        else give torch's kernel a 64-byte aligned copy if it is not (e.g. taken straight from a safetensors file).
        The packed copy replaces the file's: the mapped pages are released with it."""
        if self.packed or self.weight.device.type != "cpu":
            return
        if self.in_features % PACK_BYTES == 0 and int8_packed_kernel() is not None:
            self.weight, self.packed = pack_rows(self.weight), True
        elif self.weight.data_ptr() % 64:
            self.weight = self.weight.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.device.type != "cpu":  # e.g. a CPU-loaded model moved by .cuda(): the packed rows read back in place
            w = unpack_rows(self.weight, self.out_features) if self.packed else self.weight
            return F.linear(x, w.to(x.dtype)) * self.scales.to(x.dtype)
        if self.packed:
            mm = int8_packed_mm_op if torch.compiler.is_compiling() else _int8_packed_mm
            out = mm(rows, self.weight, self.scales, self.out_features)
        else:
            out = (int8_mm_op if torch.compiler.is_compiling() else _int8_mm)(rows, self.weight, self.scales)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(Int8Rows):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


def swappable(model: nn.Module, embeddings: bool = True) -> list[tuple[str, nn.Module, str]]:
    """(state-dict prefix, parent, attribute) of every nn.Linear (and nn.Embedding) that becomes int8."""
    return [
        (f"{pname}.{name}".lstrip("."), parent, name)
        for pname, parent in model.named_modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear or (embeddings and type(child) is nn.Embedding)
    ]


def quantize_model(
    model: nn.Module,
    embeddings: bool = True,
    init: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    bits: int = 8,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> nn.Module:
    """Swap nn.Linear (and nn.Embedding if `embeddings`) for int8 modules, in place, one module at a time; with
    `bits=4` the linears become `Int4Linear` (groups of `group_size` inputs) and the embedding int8.

    On a meta-device model the new modules stay on meta (to be filled by a strict load) unless `init(shape)` is
    given: it then makes each fp32 weight just before it is quantized, so the full-precision model never exists.
    """
    check_bits(bits)
    targets = swappable(model, embeddings)
    if bits == 4:
        for prefix, parent, name in targets:
            child = getattr(parent, name)
            if type(child) is nn.Linear:
                check_group_size(child.in_features, group_size, prefix)
    # Largest first: with `init`, the big fp32 temporaries (embedding, output) exist while little else does.
    for _, parent, name in sorted(targets, key=lambda t: -getattr(t[1], t[2]).weight.numel()):
        child = getattr(parent, name)
        if type(child) is nn.Embedding:
            make = Int8Embedding.from_weight
        elif bits == 4:
            make = lambda w: Int4Linear.from_weight(w, group_size)  # noqa: E731
        else:
            make = Int8Linear.from_weight
        w = child.weight
        if w.is_meta and init is not None:
            w = init(tuple(w.shape))
        setattr(parent, name, make(w.detach()))
        del child, w
    return model


def check_bits(bits: int) -> None:
    if bits not in QUANT_FORMATS:
        raise AquilaError(f"quantization bits must be 8 or 4, got {bits!r}")


def prepare_for_cpu(model: nn.Module) -> nn.Module:
    """Put every int8 and int4 linear of a CPU model into its kernel's layout (once, after loading)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.prepare_for_cpu()
    return prepare_int4(model)


def _quantizer(keys: set[str], int4_keys: set[str], group_size: int):
    """(key, tensor) -> its entries in a quantized state dict: int4 for `int4_keys`, int8 for the other `keys`."""

    def convert(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if key not in keys:
            return {key: tensor.float()}
        q, s = quantize_weight_int4(tensor, group_size) if key in int4_keys else quantize_weight(tensor)
        return {key: q, key.removesuffix(".weight") + ".scales": s}

    return convert


def quantize_state_dict(
    state: Mapping[str, torch.Tensor],
    keys: set[str],
    int4_keys: set[str] = frozenset(),
    group_size: int = DEFAULT_GROUP_SIZE,
) -> dict[str, torch.Tensor]:
    """Quantize the `keys` of a (possibly memory-mapped) state dict tensor by tensor (`int4_keys` to int4, the
    others to int8); other tensors become fp32."""
    convert, out = _quantizer(keys, set(int4_keys), group_size), {}
    for key, tensor in progress(state.items(), "quantizing", len(state)):
        out.update(convert(key, tensor))
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state dict (what one decode step reads, KV cache aside), in the layout the weights are held."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def quantized_state(
    md: ModelDir, embeddings: bool = True, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE
) -> dict[str, torch.Tensor]:
    """An unquantized directory's weights, quantized tensor by tensor (the fp32 model is never built). Our own
    safetensors file is streamed (each tensor quantized before the next is read: peak = the quantized model plus
    one fp32 tensor); other sources are memory-mapped."""
    if md.format == "int8":
        raise AquilaError(f"{md.path}: already quantized")
    model = meta_model(md.args)
    targets = swappable(model, embeddings)
    keys = {f"{prefix}.weight" for prefix, _, _ in targets}
    int4_keys = {f"{p}.weight" for p, parent, name in targets if bits == 4 and type(getattr(parent, name)) is nn.Linear}
    quantized = quantize_model(model, embeddings, bits=bits, group_size=group_size)  # checks bits and group size
    if md.format == "aquila" and (md.path / SAFETENSORS_NAME).is_file():
        convert, state = _quantizer(keys, int4_keys, group_size), {}
        weights = md.path / SAFETENSORS_NAME
        for key, tensor in progress(iter_safetensors(weights), "quantizing", tensor_count(weights)):
            state.update(convert(key, tensor))
        check_state_dict(quantized, state, str(md.path / SAFETENSORS_NAME))
        return state
    state = md.read_state()
    check_state_dict(meta_model(md.args), state, str(md.path))
    return quantize_state_dict(state, keys, int4_keys, group_size)


def read_quant_config(md: ModelDir) -> dict:
    """quantization.json of a quantized directory, checked: {"bits", "group_size", "embeddings"}."""
    path = md.path / QUANT_CONFIG
    qcfg = read_json(path)
    formats = {v: k for k, v in QUANT_FORMATS.items()}
    if qcfg.get("format") not in formats:
        raise AquilaError(f"{path}: format {qcfg.get('format')!r} is not one of {', '.join(map(repr, formats))}")
    bits = formats[qcfg["format"]]
    group_size = qcfg.get("group_size", DEFAULT_GROUP_SIZE) if bits == 4 else DEFAULT_GROUP_SIZE
    if bits == 4 and not isinstance(group_size, int):
        raise AquilaError(f"{path}: group_size must be an integer, got {group_size!r}")
    return {"bits": bits, "group_size": group_size, "embeddings": bool(qcfg.get("embeddings", True))}


def quantized_bits(md: ModelDir) -> int | None:
    """8 or 4 for a quantized directory, None for a full-precision one."""
    return read_quant_config(md)["bits"] if md.format == "int8" else None


def load_quantized(
    md: ModelDir,
    dtype: torch.dtype = torch.float32,
    bits: int = 8,
    group_size: int = DEFAULT_GROUP_SIZE,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A quantized model from a quantized directory (as written: `bits` and `group_size` are then read from
    its quantization.json), or from any other one by quantizing its weights on the way in. On CPU the weights
    are then put in the kernels' layouts (int8 aligned, int4 packed)."""
    embeddings = True
    if md.format == "int8":
        qcfg = read_quant_config(md)
        bits, group_size, embeddings = qcfg["bits"], qcfg["group_size"], qcfg["embeddings"]
        weights = md.path / SAFETENSORS_NAME
        state = dict(iter_safetensors(weights)) if weights.is_file() else md.read_state()
    else:
        state = quantized_state(md, bits=bits, group_size=group_size)
    model = quantize_model(meta_model(md.args), embeddings=embeddings, bits=bits, group_size=group_size)
    load_into(model, state, str(md.path), dtype)
    del state
    model = model.to(device)
    if torch.device(device).type == "cpu":
        prepare_for_cpu(model)
    release_freed_memory()
    return model


def load_int8(md: ModelDir, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An int8 model from an int8 directory, or from any other one by quantizing its weights on the way in."""
    return load_quantized(md, dtype, bits=8)


def quantize_dir(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    embeddings: bool = True,
    bits: int = 8,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> None:
    """Any model directory AutoLoader reads -> a self-contained int8 or int4 directory (no fp32 model copy)."""
    md = ModelDir.open(src)
    check_bits(bits)
    if bits == 4:
        weights = (
            f"linear layers int4 asymmetric in groups of {group_size} inputs: *.weight uint8 [out, in/2] (low "
            "nibble first), *.scales bf16 [out, in/group, 2] = (scale, zero), w = (q - 8) * scale + zero; "
            "embedding int8 with one fp32 scale per row"
        )
        qcfg = {"format": QUANT_FORMATS[4], "version": 1, "weights": weights, "group_size": group_size}
    else:
        weights = "int8 symmetric, one fp32 scale per output channel (key *.scales)"
        qcfg = {"format": QUANT_FORMAT, "version": 1, "weights": weights}
    qcfg["embeddings"] = embeddings
    state = quantized_state(md, embeddings, bits, group_size)
    write_model_dir(dst, md.args, state, "aquila", ("safetensors",), src, {QUANT_CONFIG: qcfg})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="aquila quantize",
        description="save an int8 or int4 weight-only quantized model",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("src", help="model directory (ours, FlagAI's config.json + pytorch_model.bin, or HF Llama)")
    parser.add_argument("dst", help="output directory (must be new or empty unless --overwrite)")
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8, help="8: per-channel int8; 4: group-wise int4")
    parser.add_argument(
        "--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="inputs sharing one int4 scale (32, 64, 128, 256)"
    )
    parser.add_argument("--keep-embeddings", action="store_true", help="leave the token embedding in fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = parser.parse_args(argv)
    check_destination(args.dst, args.overwrite, source=args.src)
    quantize_dir(args.src, args.dst, embeddings=not args.keep_embeddings, bits=args.bits, group_size=args.group_size)
    print(f"wrote int{args.bits} model to {args.dst}")
    return 0
