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
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from aquila.errors import AquilaError
from aquila.io_utils import atomic_dir
from aquila.tokenizer import copy_tokenizer_files

QUANT_CONFIG = "quantization.json"
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


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> Int8Linear:
        module = cls(w.shape[1], w.shape[0], device=w.device)
        if not w.is_meta:
            module.weight, module.scales = quantize_weight(w)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features)
            if torch.compiler.is_compiling():
                out = int8_mm_op(flat, self.weight, self.scales)
            else:
                if self.weight.data_ptr() % 64:
                    # The kernel reads the weight with aligned vector loads; a tensor taken straight from a
                    # safetensors file can sit at any offset, so move such a weight once into a fresh allocation.
                    self.weight = self.weight.clone()
                out = _int8_mm(flat, self.weight, self.scales)
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.register_buffer("weight", torch.empty(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> Int8Embedding:
        module = cls(w.shape[0], w.shape[1], device=w.device)
        if not w.is_meta:
            module.weight, module.scales = quantize_weight(w)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


def quantize_model(
    model: nn.Module,
    embeddings: bool = True,
    init: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
) -> nn.Module:
    """Swap nn.Linear (and nn.Embedding if `embeddings`) for int8 modules, in place, one module at a time.

    On a meta-device model the int8 modules stay on meta (to be filled by a strict load) unless `init(shape)` is
    given: it then makes each fp32 weight just before it is quantized, so the full-precision model never exists.
    """
    todo = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear or (embeddings and type(child) is nn.Embedding):
                todo.append((parent, name, child.weight.numel()))
    # Largest first: with `init`, the big fp32 temporaries (embedding, output) exist while little else does.
    for parent, name, _ in sorted(todo, key=lambda t: -t[2]):
        child = getattr(parent, name)
        make = Int8Linear.from_weight if type(child) is nn.Linear else Int8Embedding.from_weight
        w = child.weight
        if w.is_meta and init is not None:
            w = init(tuple(w.shape))
        setattr(parent, name, make(w.detach()))
        del child, w
    return model


def align_weights(model: nn.Module) -> nn.Module:
    """Copy int8 weights that are not 64-byte aligned (e.g. taken straight from a safetensors file)."""
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.weight.data_ptr() % 64:
            module.weight = module.weight.clone()
    return model


def quantize_state_dict(
    state: Mapping[str, torch.Tensor], linear_keys: set[str], embedding_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Quantize a (possibly memory-mapped) state dict tensor by tensor; other tensors become fp32."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in linear_keys or key in embedding_keys:
            q, s = quantize_weight(tensor)
            out[key] = q
            out[key.removesuffix(".weight") + ".scales"] = s
        else:
            out[key] = tensor.float()
    return out


def quantizable_keys(model: nn.Module, embeddings: bool = True) -> tuple[set[str], set[str]]:
    """State-dict keys of the weights `quantize_model` would quantize: (linear, embedding)."""
    linear, embedding = set(), set()
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            linear.add(f"{name}.weight")
        elif embeddings and type(module) is nn.Embedding:
            embedding.add(f"{name}.weight")
    return linear, embedding


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state dict (what one decode step reads, KV cache aside)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def quant_config(embeddings: bool) -> dict:
    return {
        "format": QUANT_FORMAT,
        "version": 1,
        "weights": "int8 symmetric, one fp32 scale per output channel (key *.scales)",
        "embeddings": embeddings,
    }


def save_quantized_dir(
    state: Mapping[str, torch.Tensor], config: dict, out_dir: str | os.PathLike, embeddings: bool, tokenizer_from=None
) -> None:
    """Write a quantized model directory atomically (tokenizer files copied from `tokenizer_from` if present)."""
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / QUANT_CONFIG).write_text(json.dumps(quant_config(embeddings), indent=2) + "\n")
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)


def quantize_dir(src: str | os.PathLike, dst: str | os.PathLike, embeddings: bool = True) -> None:
    """Any model directory AutoLoader reads -> a quantized directory, tensor by tensor (no fp32 model copy)."""
    from aquila.inference.loader import read_model_state
    from aquila.model import AquilaModel

    args, state = read_model_state(src)
    with torch.device("meta"):
        linear, embedding = quantizable_keys(AquilaModel(args), embeddings)
    qstate = quantize_state_dict(state, linear, embedding)
    save_quantized_dir(qstate, args.to_dict(), dst, embeddings, tokenizer_from=src)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila quantize", description="save an int8 weight-only quantized model")
    parser.add_argument("src", help="model directory (ours, FlagAI's config.json + pytorch_model.bin, or HF Llama)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--keep-embeddings", action="store_true", help="leave the token embedding in fp32")
    args = parser.parse_args(argv)
    if not Path(args.src).is_dir():
        raise AquilaError(f"{args.src}: model directory not found")
    quantize_dir(args.src, args.dst, embeddings=not args.keep_embeddings)
    print(f"wrote int8 model to {args.dst}")
    return 0
