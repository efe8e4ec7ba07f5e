"""`aquila info NAME_OR_DIR`: a model's config and parameter count, computed without allocating weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from aquila.cli_help import HelpFormatter
from aquila.config import ModelArgs

KINDS = {"aquila": "FlagAI directory", "hf": "Hugging Face directory", "int8": "int8 directory"}


def resolve_args(name_or_dir: str) -> tuple[ModelArgs, str]:
    """Model shape from a preset name or any model directory."""
    if Path(name_or_dir).is_dir():
        from aquila.checkpoint import ModelDir  # torch: only for directories, presets stay instant

        md = ModelDir.open(name_or_dir)
        return md.args, KINDS[md.format]
    return ModelArgs.from_name(name_or_dir), "preset"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila info", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model", help="preset name (e.g. aquila-7b) or model directory")
    opts = parser.parse_args(argv)
    args, kind = resolve_args(opts.model)
    print(f"{opts.model} ({kind})")
    for key, value in args.to_dict().items():
        print(f"  {key:<18} {value}")
    print(f"  {'head_dim':<18} {args.head_dim}")
    print(f"  {'ffn_dim':<18} {args.ffn_dim}")
    n = args.num_params()
    print(f"parameters: {n:,} ({n / 1e9:.2f} B; {n * 2 / 2**30:.2f} GiB in bf16, {n / 2**30:.2f} GiB in int8)")
    return 0
