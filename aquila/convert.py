"""`aquila convert SRC DST --to hf|flagai|gguf`: convert a model directory to FlagAI's, Hugging Face's or llama.cpp's
format.

The source format is detected (aquila.checkpoint.ModelDir). A directory output is self-contained: weights, config
and the tokenizer files; a Hugging Face export also gets tokenizer.json + tokenizer_config.json (with the chat
template) for `AutoTokenizer` (BOS prepended as aquila does). `--to gguf` writes one file DST (aquila.gguf_export:
weights in `--outtype`, tokenizer and chat template included) for llama.cpp, streamed: the safetensors weights are
read, converted and written one tensor at a time (ModelDir.iter_state), so a model larger than the memory converts
(FlagAI's pytorch_model.bin and sharded training steps are read whole, memory-mapped). DST must be new or empty
unless `--overwrite`, and never the source, inside it or around it; it is written under a temporary name and
renamed, so it is never a mix of old and new files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aquila.checkpoint import ModelDir, check_destination, check_state_dict, meta_model, write_model_dir
from aquila.cli_help import HelpFormatter
from aquila.dtypes import DTYPES
from aquila.errors import AquilaError

DTYPE_CHOICES = ("bfloat16", "float16", "float32")
OUTTYPES = ("f32", "f16", "q8_0", "q4_0")  # aquila.gguf_export.OUTTYPES, without importing gguf for --help


def convert(
    src: Path,
    dst: Path,
    to: str,
    dtype: torch.dtype | None = None,
    overwrite: bool = True,
    outtype: str = "f32",
) -> None:
    check_destination(dst, overwrite, source=src)
    if to == "gguf":
        from aquila.gguf_export import gguf_destination

        gguf_destination(Path(dst))
    md = ModelDir.open(src)
    if md.format == "int8":
        raise AquilaError(f"{src}: an int8 directory cannot be converted; convert its full-precision source instead")
    if to == "gguf":  # streamed: header from the shapes, then tensor by tensor (the model may exceed the memory)
        from aquila.gguf_export import write_gguf

        shapes = md.state_shapes()
        check_state_dict(meta_model(md.args), shapes, str(src))  # strict, before anything is written
        write_gguf(dst, md.args, shapes, md.iter_state(), src, outtype, name=Path(src).resolve().name)
        return
    state = md.read_state()
    check_state_dict(meta_model(md.args), state, str(src))  # strict, before anything is written
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    write_model_dir(dst, md.args, state, "hf" if to == "hf" else "aquila", tokenizer_from=src)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila convert", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path, help="output directory (--to hf|flagai) or .gguf file (--to gguf)")
    parser.add_argument("--to", choices=("hf", "flagai", "gguf"), required=True)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast weights (default: keep; hf, flagai)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f32", help="GGUF weight type (--to gguf)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    opts = parser.parse_args(argv)
    if opts.to == "gguf" and opts.dtype is not None:
        parser.error("--dtype is for --to hf|flagai; --to gguf takes --outtype")
    convert(opts.src, opts.dst, opts.to, DTYPES.get(opts.dtype), opts.overwrite, opts.outtype)
    print(f"wrote {opts.to} model to {opts.dst}")
    return 0
