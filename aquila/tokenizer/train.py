"""`aquila train-tokenizer`: train a byte-level BPE tokenizer and write FlagAI's file set.

    aquila train-tokenizer --input a.jsonl b.txt --vocab-size 100000 --output tok/ [--json-key text]

`--vocab-size` counts the base vocabulary (vocab.json entries: <|endoftext|> at id 0, the 256 byte symbols, merges);
Aquila's 8 special tokens are appended after it, so the model's vocab_size is N + 8. Files ending in `.jsonl` or
`.json` are read as one JSON object per line (the text under --json-key); any other file as plain text.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from aquila.cli_help import HelpFormatter
from aquila.errors import AquilaError
from aquila.tokenizer.base import ENDOFTEXT
from aquila.tokenizer.bpe import Tokenizer

MIN_VOCAB_SIZE = 256 + 1  # the byte alphabet + <|endoftext|>
# tokenizers' BpeTrainer reserves a word->id map and an id->word list of vocab_size entries before it merges:
# --vocab-size 1,000,000,000 asked for ~70 GB and aborted the process.
TRAINER_BYTES_PER_ENTRY = 72
_PLAIN_CHUNK_CHARS = 1 << 16


def iter_corpus(files: Sequence[str | os.PathLike], json_key: str = "text") -> Iterator[str]:
    """Texts of jsonl (`.jsonl`/`.json`: one object per line, text under `json_key`) and plain text files.

    Plain text is cut at line ends into ~64k-character pieces (newlines kept), so paragraph structure survives.
    """
    paths = _existing(files)
    for p in paths:
        jsonl = _is_jsonl(p)
        with open(p, "rb") as f:
            chunk: list[str] = []
            size = 0
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise AquilaError(f"{p}:{lineno}: not UTF-8 text") from None
                if not jsonl:
                    chunk.append(line)
                    size += len(line)
                    if size >= _PLAIN_CHUNK_CHARS:
                        yield "".join(chunk)
                        chunk, size = [], 0
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AquilaError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or json_key not in obj:
                    raise AquilaError(f"{p}:{lineno}: no {json_key!r} key (set --json-key)")
                text = obj[json_key]
                if not isinstance(text, str):
                    raise AquilaError(f"{p}:{lineno}: {json_key!r} must be a string, got {type(text).__name__}")
                yield text
            if chunk:
                yield "".join(chunk)


def estimate_documents(files: Sequence[str | os.PathLike]) -> int:
    """About how many texts iter_corpus will yield (jsonl lines + plain-text pieces), for the progress bar.

    Counting newlines runs at disk speed, a small fraction of the training time.
    """
    total = 0
    for p in _existing(files):
        if _is_jsonl(p):
            with open(p, "rb") as f:
                total += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
        else:
            total += max(1, p.stat().st_size // _PLAIN_CHUNK_CHARS)
    return total


def _existing(files: Sequence[str | os.PathLike]) -> list[Path]:
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise AquilaError(f"input file {p} does not exist")
    return paths


def _is_jsonl(path: Path) -> bool:
    return path.suffix in (".jsonl", ".json")


def check_vocab_size(vocab_size: int) -> None:
    """At least the byte alphabet, and no more than this machine can reserve for the trainer."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise AquilaError(
            f"--vocab-size {vocab_size} is smaller than {MIN_VOCAB_SIZE} (256 byte symbols + {ENDOFTEXT}); "
            "the 8 Aquila special tokens are appended after the base vocabulary"
        )
    need, have = vocab_size * TRAINER_BYTES_PER_ENTRY, physical_memory()
    if have and need > have:
        raise AquilaError(
            f"--vocab-size {vocab_size:,} needs about {need / 1e9:,.0f} GB before training starts (tokenizers' trainer "
            f"reserves ~{TRAINER_BYTES_PER_ENTRY} bytes per entry), more than this machine's {have / 1e9:,.0f} GB"
        )


def physical_memory() -> int | None:
    """Bytes of RAM, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not on Linux/macOS
        return None


def check_learnable(vocab_size: int, files: Sequence[str | os.PathLike]) -> None:
    """Each merge adds one entry and joins two adjacent symbols of the text, so a corpus of B bytes has fewer than B
    merges to learn: asking for more is a mistake, found before reading the input."""
    size = sum(p.stat().st_size for p in _existing(files))
    limit = MIN_VOCAB_SIZE + size
    if vocab_size > limit:
        raise AquilaError(
            f"--vocab-size {vocab_size:,} cannot be learned from {size:,} bytes of input: each merge joins two "
            f"symbols of the text, so at most {limit:,} entries ({MIN_VOCAB_SIZE} + one per input byte)"
        )


def check_output(output: str | os.PathLike) -> None:
    """--output must be a directory or a path one can create (not an existing file, nor below one)."""
    out = Path(output)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == out else f" ({p} is a file)"
                raise AquilaError(f"--output {out}{where}: expected a directory to write the tokenizer files into")
            return


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` base entries (<|endoftext|> = id 0, then the 256 byte symbols).

    A corpus too small to support that many merges gives a smaller base vocabulary; the specials follow it.
    `length` (number of texts, may be approximate) only sizes the progress bar.
    """
    check_vocab_size(vocab_size)
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    chars = 0

    def counted() -> Iterator[str]:  # the trainer consumes the texts; we need to know whether there were any
        nonlocal chars
        for text in texts:
            chars += len(text)
            yield text

    backend.train_from_iterator(counted(), trainer=trainer, length=length)
    if chars == 0:
        raise AquilaError("the training corpus is empty (no text found in the input)")
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Tokenizer(model["vocab"], merges, source="trained vocabulary")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila train-tokenizer", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl (.jsonl/.json) or plain text files")
    parser.add_argument("--vocab-size", type=int, required=True, help="base vocabulary size (specials go after it)")
    parser.add_argument("--output", required=True, help="directory to write vocab.json, merges.txt, ...")
    parser.add_argument("--json-key", default="text", help="key of the text in jsonl records")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair count to merge")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_vocab_size(args.vocab_size)  # fail before reading any input
    check_output(args.output)
    check_learnable(args.vocab_size, args.input)
    progress = not args.no_progress
    length = estimate_documents(args.input) if progress else None
    texts = iter_corpus(args.input, json_key=args.json_key)
    tok = train_bpe(texts, args.vocab_size, min_frequency=args.min_frequency, show_progress=progress, length=length)
    tok.save_pretrained(args.output)
    note = "" if tok.base_size == args.vocab_size else f" (corpus too small for {args.vocab_size})"
    print(f"wrote {args.output}: {tok.base_size} base entries{note} + 8 specials = {len(tok)} ids")
    return 0
