"""Model weights on disk: FlagAI's `pytorch_model.bin`, our `model.safetensors`, strict loading.

A model directory holds `config.json` plus `model.safetensors` and/or `pytorch_model.bin` (a plain state dict
or one wrapped under `module`). Loading never holds two copies of the weights: the model is built on the meta
device and takes the loaded (memory-mapped) tensors directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.io_utils import atomic_path
from aquila.model import AquilaModel

SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one weights file (safetensors or a torch pickle) onto the CPU, memory-mapped where possible."""
    path = Path(path)
    if not path.is_file():
        raise AquilaError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AquilaError(f"{path}: not a valid safetensors file ({e})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt or non-zip pickles
        raise AquilaError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(data, Mapping) and "module" in data and isinstance(data["module"], Mapping):
        data = data["module"]  # FlagAI's non-BMTrain saves wrap the state dict
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise AquilaError(f"{path}: expected a state dict of tensors")
    return dict(data)


def _summarise(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict check: the same keys and shapes as the model, or one error line listing what differs."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected.keys() & state.keys()
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_summarise(wrong)}")
    if problems:
        raise AquilaError(f"{source}: checkpoint does not match the model; " + "; ".join(problems))


def load_into(
    model: AquilaModel, state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype | None = None
) -> None:
    """Strictly load `state` into `model` (which may live on the meta device), converting to `dtype`."""
    check_state_dict(model, state, source)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:
        target = next(model.parameters()).dtype if dtype is None else dtype
        state = {k: v.to(target) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=on_meta)


def find_weights(model_dir: str | os.PathLike) -> Path:
    model_dir = Path(model_dir)
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (model_dir / name).is_file():
            return model_dir / name
    raise AquilaError(f"{model_dir}: no weights found (expected {SAFETENSORS_NAME} or {BIN_NAME})")


def build_model(
    args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int | None = None
) -> AquilaModel:
    """A freshly initialised model (FlagAI's init), built directly on `device` in `dtype`."""
    with torch.device(device):
        model = AquilaModel(args).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.init_weights(gen)
    return model


def load_model_dir(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str | os.PathLike | None = None,
) -> AquilaModel:
    """Load `<model_dir>/config.json` and its weights strictly, with one copy of the weights in memory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AquilaError(f"{model_dir}: model directory not found")
    args = ModelArgs.load(model_dir / CONFIG_NAME)
    path = Path(weights) if weights else find_weights(model_dir)
    state = read_state_dict(path)
    with torch.device("meta"):
        model = AquilaModel(args)
    load_into(model, state, str(path), dtype)
    return model.to(device)


def save_weights(
    state: Mapping[str, torch.Tensor], model_dir: str | os.PathLike, formats: tuple[str, ...] = ("safetensors", "bin")
) -> None:
    """Write a state dict as model.safetensors and/or FlagAI's plain-state-dict pytorch_model.bin, each atomically."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if "safetensors" in formats:
        with atomic_path(model_dir / SAFETENSORS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    if "bin" in formats:
        with atomic_path(model_dir / BIN_NAME) as tmp:
            torch.save(state, tmp)


def save_model_dir(
    model: AquilaModel, model_dir: str | os.PathLike, formats: tuple[str, ...] = ("safetensors", "bin")
) -> None:
    """Write config.json and weights (each file atomically)."""
    save_weights(model.state_dict(), model_dir, formats)
    model.args.save(Path(model_dir) / CONFIG_NAME)
