"""`aquila check-dataset PREFIX...`: validate indexed datasets and print their counts.

The `.bin` itself carries no checksum; when `<prefix>.crc32.json` exists (written by `aquila preprocess
--checksum` or `aquila merge-datasets --checksum`) every 64 MiB chunk is verified against it."""

from __future__ import annotations

import argparse

import numpy as np

from aquila.cli_help import HelpFormatter
from aquila.data.indexed_dataset import MMapIndexedDataset, verify_checksums
from aquila.errors import AquilaError


def token_range(ds: MMapIndexedDataset, chunk: int = 1 << 24) -> tuple[int, int]:
    """(min, max) token id, read in chunks so huge datasets stay out of memory."""
    tokens = ds.tokens()
    if tokens.size == 0:
        return 0, -1
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for start in range(0, tokens.size, chunk):
        part = tokens[start : start + chunk]
        lo, hi = min(lo, int(part.min())), max(hi, int(part.max()))
    return lo, hi


def check_vocab(ds: MMapIndexedDataset, vocab_size: int) -> None:
    """AquilaError unless every token id of `ds` is in [0, vocab_size) (one pass over the memmapped tokens)."""
    _raise_outside(ds, *token_range(ds), vocab_size)


def _raise_outside(ds: MMapIndexedDataset, lo: int, hi: int, vocab_size: int) -> None:
    if ds.num_tokens and (lo < 0 or hi >= vocab_size):
        raise AquilaError(f"{ds.prefix}.bin: token ids span [{lo}, {hi}], outside the vocabulary of {vocab_size}")


def check(prefix: str, vocab_size: int | None = None) -> dict[str, int | str]:
    ds = MMapIndexedDataset(prefix)
    lo, hi = token_range(ds)
    if vocab_size is not None:
        _raise_outside(ds, lo, hi, vocab_size)
    verified = verify_checksums(prefix)
    return {
        "prefix": prefix,
        "dtype": str(ds.dtype),
        "sequences": len(ds),
        "documents": ds.num_documents,
        "tokens": ds.num_tokens,
        "min_id": lo,
        "max_id": hi,
        "checksum": "verified" if verified else "none (no .crc32.json sidecar)",
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila check-dataset", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX", help="dataset prefix (without .bin/.idx)")
    parser.add_argument("--vocab-size", type=int, default=None, help="also check every token id is below this")
    args = parser.parse_args(argv)
    total = 0
    for prefix in args.prefixes:
        info = check(prefix, args.vocab_size)
        total += int(info["tokens"])
        print(f"{prefix}:")
        for key in ("dtype", "sequences", "documents", "tokens", "checksum"):
            print(f"  {key}: {info[key]}")
        if int(info["tokens"]):
            print(f"  token ids: {info['min_id']}..{info['max_id']}")
    if len(args.prefixes) > 1:
        print(f"total tokens: {total}")
    return 0
