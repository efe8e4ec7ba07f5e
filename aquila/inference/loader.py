"""`AutoLoader`: FlagAI's loading entry point, local directories only (no network, ever).

`AutoLoader("lm", model_dir="./checkpoints_in", model_name="aquila-7b")` reads `<model_dir>/<model_name>/`:

- an int8 or int4 directory written by `aquila quantize` (has `quantization.json`);
- a Hugging Face `LlamaForCausalLM` directory (config.json with `model_type`);
- FlagAI's or ours: `config.json` + `model.safetensors` or `pytorch_model.bin`.

Weights are loaded strictly and without two copies (meta-device build; our safetensors files are read tensor by
tensor into fresh memory, converted on the way in, so a loaded model costs its own bytes: no file mapping stays
resident beside an fp16, packed or quantized copy; other files are memory-mapped). The tokenizer comes
from the same directory, loaded on the first `get_tokenizer()`. The static KV cache is always used and sized at
generation time, so `use_cache` and `max_batch_size` are accepted for compatibility only (`IGNORED_ARGS`).

On CPU, `model.half()` (as in the model card) is left to do what it says: on AVX-512 CPUs fp16 decoding measured
no slower than fp32 (bench/README.md, "Generation"), with half the memory; results can differ from fp32 by fp16
rounding. The KV cache follows the model's dtype.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from aquila.checkpoint import ModelDir, load_into, meta_model
from aquila.constants import CONFIG_NAME, SAFETENSORS_NAME
from aquila.dtypes import parse_dtype
from aquila.errors import AquilaError
from aquila.inference.quantize import load_quantized, prepare_for_cpu, quantize_model, quantized_bits
from aquila.inference.tensor_file import iter_safetensors, release_freed_memory
from aquila.lora import merge_adapter
from aquila.model import AquilaModel
from aquila.optional import require
from aquila.typed_config import is_int

TASKS = ("lm",)
QUANT_MODES = {None: None, "int8": 8, "int4": 4}
# The one table of FlagAI's AutoLoader arguments that are accepted (so that its scripts run unchanged) and have
# no effect here. Each maps to the value that behaves like aquila (_ANY: any value does) and why; another value
# prints one warning line. only_download_config=True is an error instead: nothing is ever downloaded.
_ANY = object()
IGNORED_ARGS: dict[str, tuple[object, str]] = {
    "use_cache": (True, "generation always uses the static KV cache"),
    "max_batch_size": (_ANY, "the KV cache is sized when generation starts, for the batch it is given"),
    "only_download_config": (False, "AutoLoader never downloads"),
    "low_cpu_mem_usage": (_ANY, "weights are always loaded without a second copy (meta device, memory-mapped files)"),
    "inference_mode": (_ANY, "the model is returned in eval mode"),
    "all_devices": (_ANY, "the model is loaded onto `device`"),
}
COMPAT_KWARGS = frozenset(IGNORED_ARGS) - {"use_cache", "max_batch_size"}  # the ones that arrive in **kwargs


def check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AquilaError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AquilaError(f"device {device!r} requested but CUDA is not available (use device='cpu')")
    return dev


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    adapter_dir: str | os.PathLike | None = None,
    quantize: str | None = None,
) -> AquilaModel:
    """Load any supported model directory onto `device`, then apply the adapter and quantization transforms."""
    if quantize not in QUANT_MODES:
        raise AquilaError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    dev = check_device(device)
    dtype = dtype or torch.float32
    md = ModelDir.open(path)
    bits = quantized_bits(md)
    if bits is not None and adapter_dir is not None:
        raise AquilaError(f"{path} is quantized: merge the adapter into the full-precision model, then quantize")
    if bits is not None and quantize is not None and QUANT_MODES[quantize] != bits:
        raise AquilaError(f"{path} is an int{bits} directory; quantize={quantize!r} needs a full-precision one")
    if quantize == "int4" and dev.type != "cpu":
        raise AquilaError("int4 runs on CPU only (its kernels are CPU kernels); use quantize='int8' on CUDA")
    if bits is not None or (quantize and adapter_dir is None and (quantize == "int4" or not _use_bminf(dev))):
        # an unquantized directory is quantized tensor by tensor
        return load_quantized(md, dtype, bits=bits or QUANT_MODES[quantize], device=dev).eval()
    if adapter_dir is not None:
        model = merge_adapter(md.load(), adapter_dir).to(dtype)
    else:
        model = _load_full(md, dtype=torch.float16 if quantize else dtype)  # quantize here: BMInf, which takes fp16
    return (_quantize_loaded(model, dev, quantize) if quantize else model).to(dev).eval()


def _load_full(md: ModelDir, dtype: torch.dtype) -> AquilaModel:
    """A full-precision model; our safetensors file is read tensor by tensor, each converted to `dtype` before
    the next is read (see tensor_file.py), so an fp16 load peaks at the fp16 model plus one tensor."""
    weights = md.path / SAFETENSORS_NAME
    if md.format != "aquila" or not weights.is_file():
        return md.load(dtype=dtype)
    model = meta_model(md.args)
    state = dict(iter_safetensors(weights, lambda _, t: t.to(dtype) if t.is_floating_point() else t))
    load_into(model, state, str(weights), dtype)
    release_freed_memory()
    return model


def _use_bminf(device: torch.device) -> bool:
    """BMInf's CUDA int8 kernels when installed; without them, a one-line note and aquila's own int8."""
    if device.type != "cuda":
        return False
    try:
        require("bminf", "int8 with BMInf's CUDA kernels")
    except AquilaError as e:
        print(f"note: {e}; using aquila's own int8 instead", file=sys.stderr)
        return False
    return True


def _quantize_loaded(model: AquilaModel, device: torch.device, quantize: str) -> AquilaModel:
    if quantize == "int4":
        return prepare_for_cpu(quantize_model(model, bits=4))
    if _use_bminf(device):
        import bminf

        return bminf.wrapper(model.to(device).half(), quantization=True)
    return prepare_for_cpu(quantize_model(model)) if device.type == "cpu" else quantize_model(model)


def _warn_ignored(args: dict) -> None:
    for name, (same, why) in IGNORED_ARGS.items():
        if name in args and same is not _ANY and args[name] != same:
            print(f"warning: AutoLoader: {name}={args[name]!r} has no effect: {why}", file=sys.stderr)


class AutoLoader:
    """FlagAI's AutoLoader for task "lm": `get_model()`, `get_tokenizer()`."""

    def __init__(
        self,
        task_name: str = "lm",
        model_dir: str | os.PathLike = "./checkpoints/",
        model_name: str = "aquila-7b",
        use_cache: bool = True,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype | str | None = None,
        fp16: bool = False,
        adapter_dir: str | os.PathLike | None = None,
        max_batch_size: int = 1,
        quantize: str | None = None,
        **kwargs,
    ) -> None:
        if task_name not in TASKS:
            raise AquilaError(f"task_name {task_name!r} is not supported; aquila supports: {', '.join(TASKS)}")
        unknown = sorted(set(kwargs) - COMPAT_KWARGS - {"lora_dir"})
        if unknown:
            raise AquilaError(
                f"AutoLoader: unknown argument(s) {', '.join(unknown)}; accepted: model_dir, model_name, use_cache, "
                "device, torch_dtype, fp16, adapter_dir (lora_dir), max_batch_size, quantize"
            )
        if kwargs.get("only_download_config"):
            raise AquilaError("AutoLoader never downloads: only_download_config=True is not supported")
        if kwargs.get("lora_dir") is not None:
            if adapter_dir is not None:
                raise AquilaError("give adapter_dir or lora_dir, not both")
            adapter_dir = kwargs["lora_dir"]
        dtype = parse_dtype(torch_dtype)
        if fp16:
            if dtype not in (None, torch.float16):
                raise AquilaError(f"fp16=True conflicts with torch_dtype={torch_dtype}")
            dtype = torch.float16
        if not is_int(max_batch_size, 1):
            raise AquilaError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        _warn_ignored({**kwargs, "use_cache": use_cache, "max_batch_size": max_batch_size})
        self.model_dir = Path(model_dir) / model_name
        if not self.model_dir.is_dir():
            base = Path(model_dir)
            found = sorted(p.name for p in base.iterdir() if (p / CONFIG_NAME).is_file()) if base.is_dir() else []
            shown = ", ".join(found[:10]) + (f", ... ({len(found)} in all)" if len(found) > 10 else "")
            raise AquilaError(
                f"{self.model_dir}: model directory not found (nothing is downloaded; "
                + (f"models in {model_dir}: {shown})" if found else f"{model_dir} has no model directories)")
            )
        self.model_name = model_name
        self.model = load_model(self.model_dir, device, dtype, adapter_dir, quantize)
        self._tokenizer = None

    def get_model(self) -> AquilaModel:
        return self.model

    def get_tokenizer(self):
        if self._tokenizer is None:
            from aquila.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def get_transform(self) -> None:
        return None  # FlagAI returns a transform only for vision tasks
