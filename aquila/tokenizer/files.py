"""Tokenizer files: the one rule for what a directory holds, FlagAI's readers and writers, and copying them.

FlagAI's files: `vocab.json` + `merges.txt` (GPT-2 layout, as written by Hugging Face `tokenizers`), optionally
`special_tokens_map.json` (written for other tools, never read); or a Hugging Face `tokenizer.json`; or a
sentencepiece `spiece.model` / `tokenizer.model`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from aquila.errors import AquilaError
from aquila.io_utils import write_text_atomic
from aquila.tokenizer.base import ENDOFTEXT, SPECIAL_TOKENS

MERGES_HEADER = "#version: 0.2"
SP_MODEL_FILES = ("spiece.model", "tokenizer.model")
# Every file a tokenizer directory may hold; model directories carry them beside the weights.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_FILES += SP_MODEL_FILES


def tokenizer_file(directory: str | os.PathLike) -> Path | None:
    """The file that decides which tokenizer `directory` holds, in FlagAI's order, or None if it holds none.

    `spiece.model` / `tokenizer.model` -> sentencepiece; `merges.txt` (+ `vocab.json`) or `tokenizer.json` -> BPE.
    Half a BPE (vocab.json or merges.txt alone) is an error, not "no tokenizer".
    """
    d = Path(directory)
    if not d.is_dir():
        raise AquilaError(f"tokenizer directory {d} does not exist")
    for name in (*SP_MODEL_FILES, "merges.txt", "tokenizer.json"):
        if (d / name).is_file():
            if name == "merges.txt" and not (d / "vocab.json").is_file():
                raise AquilaError(f"{d / name} has no vocab.json beside it")
            return d / name
    if (d / "vocab.json").is_file():
        raise AquilaError(f"{d} has vocab.json but no merges.txt (a BPE tokenizer needs both, or tokenizer.json)")
    return None


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy whichever tokenizer files `src` has into `dst` (model conversions keep the tokenizer beside weights)."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def check_vocab(vocab: dict[str, int], source: str) -> None:
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        missing = next((i for i, v in enumerate(ids) if i != v), len(ids))
        raise AquilaError(
            f"{source}: vocabulary ids must be exactly 0..{len(ids) - 1}; id {missing} is missing or repeated"
        )


def check_merges(
    merges: Sequence[tuple[str, str]], vocab: dict[str, int], source: str, line_numbers: list[int] | None = None
) -> None:
    """Every merge must name vocabulary tokens and produce one; the error names the file and line (or index)."""
    for i, (a, b) in enumerate(merges):
        for token in (a, b, a + b):
            if token not in vocab:
                where = f"{source}:{line_numbers[i]}" if line_numbers else f"{source}: merge {i}"
                raise AquilaError(f"{where}: merge {a!r} {b!r} uses {token!r}, which is not in vocab.json")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AquilaError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise AquilaError(f"{path} is not UTF-8 text") from None


def read_vocab_json(path: str | os.PathLike) -> dict[str, int]:
    """vocab.json: a JSON object token -> id."""
    vocab = _read_json(Path(path))
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise AquilaError(f"{path} must be a JSON object mapping token strings to integer ids")
    check_vocab(vocab, str(path))
    return vocab


def read_merges_txt(path: str | os.PathLike, vocab: dict[str, int] | None) -> list[tuple[str, str]]:
    """merges.txt: optional '#version' header, then 'left right' per line in rank order; blank lines ignored.

    With `vocab`, every merge's parts and result must be vocabulary tokens (checked again, with the file and line
    named, when a Tokenizer is built from a directory).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise AquilaError(f"{path} is not UTF-8 text") from None
    merges: list[tuple[str, str]] = []
    line_numbers: list[int] = []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise AquilaError(f"{path}:{lineno}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
        line_numbers.append(lineno)
    if vocab is not None:
        check_merges(merges, vocab, str(path), line_numbers=line_numbers)
    return merges


def read_tokenizer_json(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocab and merges of a Hugging Face tokenizer.json (either merges layout: "a b" or ["a", "b"])."""
    data = _read_json(Path(path))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise AquilaError(f'{path}: expected a byte-level BPE model ("model": {{"type": "BPE"}})')
    vocab, raw = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(raw, list):
        raise AquilaError(f"{path}: model.vocab must be an object and model.merges a list")
    merges: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise AquilaError(f"{path}: model.merges[{i}] must be 'a b' or ['a', 'b'], got {m!r}")
        merges.append((pair[0], pair[1]))
    # A saved tokenizer.json may carry the appended specials in model.vocab too; keep the base entries only.
    vocab = {t: i for t, i in vocab.items() if t not in SPECIAL_TOKENS}
    check_vocab(vocab, str(path))
    check_merges(merges, vocab, str(path))
    return vocab, merges


def added_token(content: str, **extra: bool) -> dict:
    """A special token as Hugging Face's json files spell it."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, **extra}


def write_flagai_files(directory: Path, vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
    """vocab.json (in id order), merges.txt (with MERGES_HEADER) and special_tokens_map.json, each atomically."""
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    write_text_atomic(directory / "vocab.json", json.dumps(ordered, ensure_ascii=False) + "\n")
    write_text_atomic(directory / "merges.txt", "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n")
    roles = {"bos": "[CLS]", "eos": "</s>", "unk": ENDOFTEXT, "pad": ENDOFTEXT, "cls": "[CLS]", "sep": "</s>"}
    special_map = {f"{role}_token": added_token(token) for role, token in roles.items()}
    write_text_atomic(directory / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
