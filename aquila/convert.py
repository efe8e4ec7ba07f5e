"""`aquila convert SRC DST --to hf|flagai`: convert a model directory between FlagAI and Hugging Face formats.

FlagAI directories hold config.json (FlagAI keys) and pytorch_model.bin and/or model.safetensors; Hugging Face
directories hold a LlamaConfig config.json and (possibly sharded) weights. The source format is detected.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aquila.checkpoint import load_model_dir, save_model_dir
from aquila.errors import AquilaError
from aquila.hf import is_hf_dir, load_hf_dir, write_hf_files
from aquila.io_utils import atomic_dir
from aquila.tokenizer import copy_tokenizer_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(src: Path, dst: Path, to: str, dtype: torch.dtype | None = None) -> None:
    if not src.is_dir():
        raise AquilaError(f"{src}: model directory not found")
    model = load_hf_dir(src) if is_hf_dir(src) else load_model_dir(src)
    if dtype is not None:
        model = model.to(dtype)
    with atomic_dir(dst) as tmp:
        if to == "hf":
            write_hf_files(model, tmp)
        else:
            save_model_dir(model, tmp)
        copy_tokenizer_files(src, tmp)  # the same files in both layouts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila convert", description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--to", choices=("hf", "flagai"), required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    opts = parser.parse_args(argv)
    convert(opts.src, opts.dst, opts.to, DTYPES.get(opts.dtype))
    print(f"wrote {opts.to} model to {opts.dst}")
    return 0
