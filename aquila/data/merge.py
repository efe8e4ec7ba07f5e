"""`aquila merge-datasets`: concatenate several .bin/.idx prefixes into one (FlagAI's merge_datasets.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from aquila.cli_help import HelpFormatter
from aquila.data.indexed_dataset import dataset_exists, merge_datasets
from aquila.errors import AquilaError


def prefixes_in_dir(directory: str | Path) -> list[str]:
    """Every `<prefix>` with both `.bin` and `.idx` in `directory`, sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise AquilaError(f"{d}: not a directory")
    found = sorted(str(p.with_suffix("")) for p in d.glob("*.idx") if dataset_exists(p.with_suffix("")))
    if not found:
        raise AquilaError(f"{d}: no .bin/.idx pairs to merge")
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila merge-datasets", description=__doc__, formatter_class=HelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="directory: merge every prefix in it (sorted by name)")
    src.add_argument("--prefixes", nargs="+", help="explicit prefixes, merged in this order")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument(
        "--checksum", action="store_true", help="also write <prefix>.crc32.json (check-dataset verifies)"
    )
    args = parser.parse_args(argv)
    prefixes = args.prefixes or prefixes_in_dir(args.input)
    out = str(Path(args.output_prefix))
    prefixes = [p for p in prefixes if str(Path(p)) != out]
    total = sum(Path(f"{p}.bin").stat().st_size for p in prefixes if Path(f"{p}.bin").is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None, file=sys.stderr) as bar:  # on a tty
        merged = merge_datasets(
            prefixes, out, on_merged=lambda p: bar.update(Path(f"{p}.bin").stat().st_size), checksum=args.checksum
        )
    print(f"merged {len(prefixes)} datasets into {out}: {len(merged)} sequences, {merged.num_tokens} tokens")
    return 0
