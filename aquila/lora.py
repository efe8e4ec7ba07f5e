"""A small LoRA, applied to the model from outside (no PEFT dependency), with PEFT's file format.

`apply_lora` swaps each targeted `nn.Linear` (FlagAI's default targets: wq, wv) for a `LoRALinear` that keeps
the same `weight` parameter (so base key names do not change) and adds `lora_A` / `lora_B`. Adapters are saved
as PEFT's adapter_config.json + adapter_model.safetensors (+ .bin), keys `base_model.model.<module>.lora_A.weight`.
`merge_lora` folds them into the base weights: W + (alpha / r) * B @ A.

    python -m aquila.lora BASE_MODEL_DIR ADAPTER_DIR OUT_DIR   # (or aquila.train.lora) write a merged model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from aquila.checkpoint import ADAPTER_CONFIG, ModelDir, check_destination, has_tokenizer, write_model_dir
from aquila.errors import AquilaError, run_command
from aquila.io_utils import atomic_path, read_json, write_text_atomic

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: B = 0, so W is unchanged
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        with torch.device("meta"):  # no throw-away random init of a full-size weight
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            out.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
            if self.bias is not None:
                out.bias = self.bias
        return out


def lora_config(r: int, alpha: float, dropout: float, targets: list[str], base: str | None = None) -> dict:
    """PEFT's adapter_config.json for these settings."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base,
    }


def apply_lora(model: nn.Module, config: dict) -> list[str]:
    """Freeze `model` and add adapters to every nn.Linear whose attribute name is in target_modules.

    Returns the adapted module names; an error if a target matches nothing.
    """
    targets = set(config["target_modules"])
    if "output" in targets:
        # The loss is fused with the output projection and reads output.weight itself (the [tokens, vocab] logits
        # never exist at once), so an adapter there would get no gradient and silently train nothing.
        raise AquilaError(
            "lora_target_modules: 'output' is not supported (the fused loss reads output.weight directly);"
            " adapt the blocks' linears (wq, wk, wv, wo, w1, w2, w3)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(
                    module, child_name, LoRALinear(child, config["r"], config["lora_alpha"], config["lora_dropout"])
                )
                adapted.append(f"{name}.{child_name}" if name else child_name)
    if not adapted:
        raise AquilaError(f"lora_target_modules {sorted(targets)}: no nn.Linear of the model has these names")
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + scaling * B @ A (in place; returns model)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_state(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA tensors of a model state dict, under PEFT's key names."""
    return {PEFT_PREFIX + k: v for k, v in full.items() if is_lora_key(k)}


def write_adapter(state: dict[str, torch.Tensor], config: dict, directory: str | os.PathLike) -> None:
    d = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(d / ADAPTER_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_path(d / ADAPTER_BIN) as tmp:
        torch.save(state, tmp)
    write_text_atomic(d / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    d = Path(directory)
    if not d.is_dir():
        raise AquilaError(f"{d}: adapter directory not found")
    config = read_json(d / ADAPTER_CONFIG)
    if (d / ADAPTER_WEIGHTS).is_file():
        state = load_file(str(d / ADAPTER_WEIGHTS))
    elif (d / ADAPTER_BIN).is_file():
        state = torch.load(d / ADAPTER_BIN, map_location="cpu", weights_only=True)
    else:
        raise AquilaError(f"{d}: no {ADAPTER_WEIGHTS} or {ADAPTER_BIN}")
    return config, state


def _load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    state = {k.removeprefix(PEFT_PREFIX).replace(".default", ""): v for k, v in state.items()}
    expected = {k for k in model.state_dict() if is_lora_key(k)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AquilaError(
            f"{source}: adapter keys do not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise AquilaError(f"{source}: adapter does not fit the model ({str(e).splitlines()[-1].strip()})") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load PEFT-named adapter weights into a model that already has `apply_lora` applied (strict)."""
    _load_adapter_state(model, read_adapter(directory)[1], directory)


def merge_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Fold an adapter directory into the model's weights (the one merger); mismatches are errors."""
    config, state = read_adapter(adapter_dir)
    try:
        apply_lora(model, config)
    except KeyError as e:
        raise AquilaError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: missing key {e.args[0]!r}") from None
    _load_adapter_state(model, state, adapter_dir)
    return merge_lora(model).requires_grad_(False)


def merge_adapter_dir(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Base model directory + adapter directory -> a self-contained merged model directory (with tokenizer)."""
    md = ModelDir.open(base_dir)
    model = merge_adapter(md.load(), adapter_dir)
    tokenizer_from = base_dir if has_tokenizer(base_dir) else adapter_dir
    write_model_dir(out_dir, md.args, model.state_dict(), tokenizer_from=tokenizer_from)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aquila.train.lora", description="merge a LoRA adapter")
    parser.add_argument("base_dir")
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir", help="output model directory (must be new or empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)

    def body() -> None:
        check_destination(args.out_dir, args.overwrite)
        merge_adapter_dir(args.base_dir, args.adapter_dir, args.out_dir)
        print(f"wrote merged model to {args.out_dir}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
