"""Model directories, the one route: detect the format, read `(ModelArgs, state)`, load strictly, write atomically.

Formats (`ModelDir.format`):
- "aquila": FlagAI's `config.json` with `model.safetensors` and/or `pytorch_model.bin` (a plain state dict or one
  wrapped under `module`), or a training step whose weights are only its ranks' shards (`model/`, a
  torch.distributed.checkpoint, read here into one full state dict);
- "hf": a `LlamaForCausalLM` directory (config.json has `model_type`; weights possibly sharded under an index);
- "int8": written by `aquila quantize` (FlagAI config + `quantization.json`; built by aquila.inference.quantize).
State dicts are always under FlagAI's names. Loading never holds two copies of the weights: the model is built
on the meta device and takes the loaded (memory-mapped) tensors directly. A converter that writes tensor by tensor
(`convert --to gguf`) streams instead (`ModelDir.state_shapes` + `iter_state`): one tensor is held at a time, so a
model larger than the memory converts.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from aquila.config import ModelArgs
from aquila.constants import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, WEIGHT_NAMES
from aquila.errors import AquilaError
from aquila.hf import args_from_hf_config, from_hf_state_dict, hf_config, to_hf_state_dict, write_hf_tokenizer
from aquila.inference.tensor_file import iter_safetensors, safetensors_index
from aquila.io_utils import atomic_dir, atomic_path, read_json
from aquila.manifest import verify_manifest
from aquila.model import AquilaModel
from aquila.tokenizer import TOKENIZER_FILES, copy_tokenizer_files, load_tokenizer, tokenizer_file

QUANT_CONFIG = "quantization.json"  # marks an int8 directory
ADAPTER_CONFIG = "adapter_config.json"  # marks a LoRA adapter directory (not a model)
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARDED_DIR = "model"  # a training step's weights as its ranks' torch.distributed.checkpoint shards
DCP_METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    return (path / DCP_METADATA).is_file()


def read_sharded_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full state dict of a torch.distributed.checkpoint directory, read in this one process (no process group),
    whatever the number of ranks that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    try:
        reader = dcp.FileSystemReader(str(path))
        tensors = reader.read_metadata().state_dict_metadata
        state = {
            k: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in tensors.items()
            if isinstance(m, TensorStorageMetadata)
        }
        if len(state) != len(tensors):
            raise ValueError("entries that are not tensors")
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the intent
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as e:  # DCP raises CheckpointException (a BaseException subclass of Exception) and others
        raise AquilaError(f"{path}: cannot read sharded weights ({type(e).__name__}: {str(e)[:200]})") from None
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one weights file (safetensors or a torch pickle) onto the CPU, memory-mapped where possible."""
    path = Path(path)
    if path.is_dir() and is_sharded(path):
        return read_sharded_state(path)
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
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype | None = None
) -> None:
    """Strictly load `state` into `model`. On the meta device the tensors are taken as they are, floating ones
    converted to `dtype` (default: the model's), except int8 `*.scales`, which stay fp32."""
    check_state_dict(model, state, source)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:
        target = dtype or next(model.parameters()).dtype
        state = {
            k: v.to(target) if v.is_floating_point() and not k.endswith(".scales") else v for k, v in state.items()
        }
    model.load_state_dict(state, strict=True, assign=on_meta)


def meta_model(args: ModelArgs) -> AquilaModel:
    """The model's structure without storage, to be filled by `load_into`."""
    with torch.device("meta"):
        return AquilaModel(args)


def build_model(
    args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int | None = None
) -> AquilaModel:
    """A freshly initialised model (FlagAI's init), built directly on `device` in `dtype`."""
    with torch.device(device):
        model = AquilaModel(args).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.init_weights(gen)
    return model


def _adapter_hint(model_dir: Path) -> str:
    if (model_dir / ADAPTER_CONFIG).is_file():
        return f"; it is a LoRA adapter directory: load its base model and pass adapter_dir='{model_dir}'"
    return ""


def find_weights(model_dir: str | os.PathLike) -> Path:
    model_dir = Path(model_dir)
    for name in WEIGHT_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    if is_sharded(model_dir / SHARDED_DIR):
        return model_dir / SHARDED_DIR
    raise AquilaError(
        f"{model_dir}: no weights found (expected {SAFETENSORS_NAME}, {BIN_NAME} or a training step's"
        f" {SHARDED_DIR}/{DCP_METADATA}){_adapter_hint(model_dir)}"
    )


def hf_weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: the shards of an index, or the single file."""
    for index_name in HF_INDEXES:
        if (model_dir / index_name).is_file():
            weight_map = read_json(model_dir / index_name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise AquilaError(f"{model_dir / index_name}: missing 'weight_map'")
            return [model_dir / f for f in sorted(set(weight_map.values()))]
    return [find_weights(model_dir)]


@dataclass(frozen=True)
class ModelDir:
    """A model directory whose config.json has been read (once) and whose format is known."""

    path: Path
    args: ModelArgs
    format: str  # "aquila", "hf" or "int8"

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelDir:
        path = Path(path)
        if not path.is_dir():
            raise AquilaError(f"{path}: model directory not found")
        # A training step's manifest.json: its model files are intact (its optim/ and rng/ states are not read here).
        verify_manifest(path, top_level_only=True, subdirs=(SHARDED_DIR,))
        config = path / CONFIG_NAME
        if not config.is_file():
            raise AquilaError(
                f"{path}: no {CONFIG_NAME} (expected a FlagAI, aquila, Hugging Face or int8 model directory)"
                + _adapter_hint(path)
            )
        data = read_json(config)
        if "model_type" in data:
            return cls(path, args_from_hf_config(data, str(config)), "hf")
        fmt = "int8" if (path / QUANT_CONFIG).is_file() else "aquila"
        return cls(path, ModelArgs.from_dict(data, str(config)), fmt)

    def read_state(self, weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
        """The weights under FlagAI's names, memory-mapped where possible (`weights`: one file to use instead)."""
        if self.format != "hf":
            return read_state_dict(weights or find_weights(self.path))
        state: dict[str, torch.Tensor] = {}
        for path in [Path(weights)] if weights else hf_weight_files(self.path):
            state.update(read_state_dict(path))
        return from_hf_state_dict(state, self.args)

    def _safetensors_files(self) -> list[Path] | None:
        """The safetensors files holding the weights, or None when they are not all safetensors."""
        files = hf_weight_files(self.path) if self.format == "hf" else [find_weights(self.path)]
        return files if all(f.suffix == ".safetensors" and f.is_file() for f in files) else None

    def state_shapes(self) -> dict[str, torch.Tensor]:
        """The weights of `read_state` as meta tensors (names, shapes and dtypes, in its order), read from the
        safetensors headers only; for `check_state_dict` before a streamed write."""
        files = self._safetensors_files()
        if files is None:
            return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self.read_state().items()}
        state: dict[str, torch.Tensor] = {}
        for path in files:
            for key, (dtype, shape, _) in safetensors_index(path).items():
                state[key] = torch.empty(shape, dtype=dtype, device="meta")
        return from_hf_state_dict(state, self.args) if self.format == "hf" else state

    def iter_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights of `read_state` one at a time, same names, order and values, each safetensors tensor read
        into fresh memory when reached (so it leaves the process when the caller drops it). Other formats are read
        as `read_state` reads them."""
        files = self._safetensors_files()
        if files is None:
            yield from self.read_state().items()
            return
        for path in files:
            for key, tensor in iter_safetensors(path, by_name=True):
                if self.format == "hf":
                    yield from from_hf_state_dict({key: tensor}, self.args).items()
                else:
                    yield key, tensor
                del tensor

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights=None) -> AquilaModel:
        """The full-precision model, strictly loaded with one copy of the weights in memory."""
        if self.format == "int8":
            raise AquilaError(f"{self.path}: an int8 directory; load it with AutoLoader (or aquila.inference.quantize)")
        model = meta_model(self.args)
        load_into(model, self.read_state(weights), str(weights or self.path), dtype)
        return model.to(device)


def load_model_dir(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str | os.PathLike | None = None,
) -> AquilaModel:
    """An aquila/FlagAI or Hugging Face directory -> the model, strictly loaded (`weights`: one file instead)."""
    return ModelDir.open(model_dir).load(device, dtype, weights)


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    """A tqdm bar on stderr when it is a terminal; the plain iterable otherwise."""
    return tqdm(items, desc=desc, total=total, unit="tensor", file=sys.stderr, disable=not sys.stderr.isatty())


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


def has_tokenizer(directory: str | os.PathLike) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def check_apart(source: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Refuse a destination that is the source, lies inside it or contains it: it would be replaced (or written into)
    while it is read, and `--overwrite` would destroy the source."""
    src, out = Path(source).resolve(), Path(out_dir).resolve()
    if src == out:
        raise AquilaError(f"{out_dir} is the source directory; choose a destination outside {source}")
    if src in out.parents:
        raise AquilaError(f"{out_dir} is inside the source directory {source}; choose a destination outside it")
    if out in src.parents:
        raise AquilaError(f"{out_dir} contains the source directory {source}; choose a destination outside it")


def check_destination(out_dir: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None) -> None:
    """Refuse an existing non-empty `out_dir` unless `overwrite` (it is then replaced whole, never mixed), and one
    that overlaps `source` (`check_apart`)."""
    if source is not None:
        check_apart(source, out_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise AquilaError(f"{out} exists and is not empty; choose a new directory or pass --overwrite to replace it")


def write_model_dir(
    out_dir: str | os.PathLike,
    args: ModelArgs,
    state: Mapping[str, torch.Tensor],
    fmt: str = "aquila",
    formats: tuple[str, ...] = ("safetensors", "bin"),
    tokenizer_from: str | os.PathLike | None = None,
    extra_json: Mapping[str, dict] | None = None,
) -> None:
    """Write a self-contained model directory in a temporary directory renamed onto `out_dir`: config.json,
    weights (fmt "aquila" or "hf"), the tokenizer files of `tokenizer_from` and `extra_json` files. A tokenizer file
    set that does not load (e.g. merges.txt without vocab.json) is refused before anything is written."""
    if tokenizer_from is not None and Path(tokenizer_from).is_dir() and tokenizer_file(tokenizer_from) is not None:
        load_tokenizer(tokenizer_from)  # tokenizer_file / load_tokenizer raise one line naming the missing file
    state = {k: v.detach().contiguous().cpu() for k, v in progress(state.items(), f"writing {out_dir}", len(state))}
    with atomic_dir(out_dir) as tmp:
        if fmt == "hf":
            dtype = next(iter(state.values())).dtype
            save_weights(to_hf_state_dict(state, args), tmp, ("safetensors",))
            config = hf_config(args, dtype)
            # Generation stops where aquila's does: at EOS and at id 0 (pad/unk), as FlagAI.
            gen = {"bos_token_id": args.vocab_size - 2, "eos_token_id": [args.vocab_size - 1, 0], "pad_token_id": 0}
            extra_json = {**(extra_json or {}), "generation_config.json": gen}
        else:
            save_weights(state, tmp, formats)
            config = args.to_dict()
        for name, data in {CONFIG_NAME: config, **(extra_json or {})}.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        if tokenizer_from is not None and has_tokenizer(tokenizer_from):
            copy_tokenizer_files(tokenizer_from, tmp)
            if fmt == "hf":
                write_hf_tokenizer(tokenizer_from, tmp, args)


def save_model_dir(
    model: AquilaModel,
    model_dir: str | os.PathLike,
    formats: tuple[str, ...] = ("safetensors", "bin"),
    fmt: str = "aquila",
    tokenizer_from: str | os.PathLike | None = None,
) -> None:
    """Write `model` as a self-contained directory, atomically; the tokenizer files come from `tokenizer_from`
    (default: those already in `model_dir`, which is replaced whole)."""
    source = tokenizer_from if tokenizer_from is not None else model_dir
    write_model_dir(model_dir, model.args, model.state_dict(), fmt, formats, source)
