"""int8 weight-only quantization, applied from outside the model (BMInf's idea, without its CUDA kernels).

Every `nn.Linear` becomes an `Int8Linear` (int8 weight [out, in] + one fp32 scale per output channel, symmetric,
scale = max|row| / 127) and, optionally, the token embedding an `Int8Embedding` (one scale per row). Norms stay
in floating point. On CPU the matmul is `torch._weight_int8pack_mm` with bf16 activations (memory-bound: it
reads the int8 weights once); elsewhere the weight is dequantized on the fly.

A quantized directory holds config.json, `model.safetensors` (int8 `*.weight` + fp32 `*.scales`), the tokenizer
files, and `quantization.json` ({"format": "aquila-int8", ...}), which is what marks it as quantized.

    aquila quantize SRC_MODEL_DIR DST_DIR [--keep-embeddings]
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
from aquila.io_utils import read_json

QUANT_FORMAT = "aquila-int8"


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
    """x [m, k] (any float) @ int8 w [n, k] with per-row scales -> [m, n] in x's dtype (CPU kernel, bf16 inputs)."""
    return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w, scales.to(torch.bfloat16)).to(x.dtype)


# Under torch.compile the kernel is called as an opaque op: inductor's own lowering of _weight_int8pack_mm fails
# when its input is a fused pointwise result (LoweringException in torch 2.13).
@torch.library.custom_op("aquila::int8_mm", mutates_args=())
def int8_mm_op(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _int8_mm(x, w, scales)


@int8_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


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
    """y = x @ (q * scales)^T; `weight` [out, in] must be 64-byte aligned on CPU (`align_weights` after a load)."""

    in_features = property(lambda self: self.weight.shape[1])
    out_features = property(lambda self: self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            mm = int8_mm_op if torch.compiler.is_compiling() else _int8_mm
            out = mm(x.reshape(-1, self.in_features), self.weight, self.scales)
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


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
) -> nn.Module:
    """Swap nn.Linear (and nn.Embedding if `embeddings`) for int8 modules, in place, one module at a time.

    On a meta-device model the int8 modules stay on meta (to be filled by a strict load) unless `init(shape)` is
    given: it then makes each fp32 weight just before it is quantized, so the full-precision model never exists.
    """
    # Largest first: with `init`, the big fp32 temporaries (embedding, output) exist while little else does.
    for _, parent, name in sorted(swappable(model, embeddings), key=lambda t: -getattr(t[1], t[2]).weight.numel()):
        child = getattr(parent, name)
        make = Int8Linear.from_weight if type(child) is nn.Linear else Int8Embedding.from_weight
        w = child.weight
        if w.is_meta and init is not None:
            w = init(tuple(w.shape))
        setattr(parent, name, make(w.detach()))
        del child, w
    return model


def align_weights(model: nn.Module) -> nn.Module:
    """Copy int8 weights that are not 64-byte aligned (e.g. taken straight from a safetensors file): the CPU
    kernel reads them with aligned vector loads. Done once, after a load."""
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.weight.data_ptr() % 64:
            module.weight = module.weight.clone()
    return model


def quantize_state_dict(state: Mapping[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    """Quantize the `keys` of a (possibly memory-mapped) state dict tensor by tensor; other tensors become fp32."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in progress(state.items(), "quantizing", len(state)):
        if key in keys:
            out[key], out[key.removesuffix(".weight") + ".scales"] = quantize_weight(tensor)
        else:
            out[key] = tensor.float()
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state dict (what one decode step reads, KV cache aside)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def quantized_state(md: ModelDir, embeddings: bool = True) -> dict[str, torch.Tensor]:
    """An unquantized directory's weights, quantized tensor by tensor (the fp32 model is never built)."""
    if md.format == "int8":
        raise AquilaError(f"{md.path}: already quantized")
    model, state = meta_model(md.args), md.read_state()
    check_state_dict(model, state, str(md.path))
    return quantize_state_dict(state, {f"{prefix}.weight" for prefix, _, _ in swappable(model, embeddings)})


def load_int8(md: ModelDir, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An int8 model from an int8 directory, or from any other one by quantizing its weights on the way in."""
    embeddings = True
    if md.format == "int8":
        qcfg = read_json(md.path / QUANT_CONFIG)
        if qcfg.get("format") != QUANT_FORMAT:
            raise AquilaError(f"{md.path / QUANT_CONFIG}: format {qcfg.get('format')!r} is not {QUANT_FORMAT!r}")
        embeddings = bool(qcfg.get("embeddings", True))
        state = md.read_state()
    else:
        state = quantized_state(md)
    model = quantize_model(meta_model(md.args), embeddings=embeddings)
    load_into(model, state, str(md.path), dtype)
    return align_weights(model)


def quantize_dir(src: str | os.PathLike, dst: str | os.PathLike, embeddings: bool = True) -> None:
    """Any model directory AutoLoader reads -> a self-contained int8 directory (no fp32 model copy)."""
    md = ModelDir.open(src)
    weights = "int8 symmetric, one fp32 scale per output channel (key *.scales)"
    extra = {QUANT_CONFIG: {"format": QUANT_FORMAT, "version": 1, "weights": weights, "embeddings": embeddings}}
    write_model_dir(dst, md.args, quantized_state(md, embeddings), "aquila", ("safetensors",), src, extra)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="aquila quantize", description="save an int8 weight-only quantized model", formatter_class=HelpFormatter
    )
    parser.add_argument("src", help="model directory (ours, FlagAI's config.json + pytorch_model.bin, or HF Llama)")
    parser.add_argument("dst", help="output directory (must be new or empty unless --overwrite)")
    parser.add_argument("--keep-embeddings", action="store_true", help="leave the token embedding in fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = parser.parse_args(argv)
    check_destination(args.dst, args.overwrite, source=args.src)
    quantize_dir(args.src, args.dst, embeddings=not args.keep_embeddings)
    print(f"wrote int8 model to {args.dst}")
    return 0
