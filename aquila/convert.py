"""`aquila convert SRC DST --to hf|flagai`: convert a model directory between FlagAI and Hugging Face formats.

The source format is detected (aquila.checkpoint.ModelDir). The output is self-contained: weights, config and the
tokenizer files; a Hugging Face export also gets tokenizer.json + tokenizer_config.json for `AutoTokenizer`
(BOS prepended as aquila does). DST must be new or empty unless `--overwrite`; it is written under a temporary
name and renamed, so it is never a mix of old and new files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aquila.checkpoint import ModelDir, check_destination, check_state_dict, meta_model, write_model_dir
from aquila.cli_help import HelpFormatter
from aquila.errors import AquilaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(src: Path, dst: Path, to: str, dtype: torch.dtype | None = None, overwrite: bool = True) -> None:
    check_destination(dst, overwrite)
    md = ModelDir.open(src)
    if md.format == "int8":
        raise AquilaError(f"{src}: an int8 directory cannot be converted; convert its full-precision source instead")
    state = md.read_state()
    check_state_dict(meta_model(md.args), state, str(src))  # strict, before anything is written
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    write_model_dir(dst, md.args, state, "hf" if to == "hf" else "aquila", tokenizer_from=src)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila convert", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--to", choices=("hf", "flagai"), required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    opts = parser.parse_args(argv)
    convert(opts.src, opts.dst, opts.to, DTYPES.get(opts.dtype), opts.overwrite)
    print(f"wrote {opts.to} model to {opts.dst}")
    return 0
