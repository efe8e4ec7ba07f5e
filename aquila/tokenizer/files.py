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
from aquila.tokenizer.base import ENDOFTEXT, SPECIAL_TOKENS, bytes_to_unicode

MERGES_HEADER = "#version: 0.2"
SP_MODEL_FILES = ("spiece.model", "tokenizer.model")
# Every file a tokenizer directory may hold; model directories carry them beside the weights.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_FILES += SP_MODEL_FILES
_BYTE_SYMBOLS = frozenset(bytes_to_unicode().values())


def tokenizer_file(directory: str | os.PathLike) -> Path | None:
    """The file that decides which tokenizer `directory` holds, in FlagAI's order, or None if it holds none.

    `spiece.model` / `tokenizer.model` -> sentencepiece; `merges.txt` (+ `vocab.json`) or `tokenizer.json` -> BPE.
    Half a BPE (vocab.json or merges.txt alone) is an error, not "no tokenizer". When merges.txt and tokenizer.json
    are both there, merges.txt decides and tokenizer.json must agree with it (`check_tokenizer_json_matches`).
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
    """Every merge must name vocabulary tokens and produce one; the error names the file and line (or index).

    And every vocabulary entry but <|endoftext|> must be a byte symbol or made by a merge: an entry that nothing makes
    can never be produced, which is what a truncated or empty merges.txt (or one from another vocabulary) looks like.
    """
    made = set()
    for i, (a, b) in enumerate(merges):
        for token in (a, b, a + b):
            if token not in vocab:
                where = f"{source}:{line_numbers[i]}" if line_numbers else f"{source}: merge {i}"
                raise AquilaError(f"{where}: merge {a!r} {b!r} uses {token!r}, which is not in vocab.json")
        made.add(a + b)
    unmade = [t for t in vocab if t not in made and t not in _BYTE_SYMBOLS and t != ENDOFTEXT]
    if unmade:
        first = min(unmade, key=vocab.__getitem__)
        raise AquilaError(
            f"{source}: {len(unmade):,} of the {len(vocab):,} vocabulary entries are made by none of the "
            f"{len(merges):,} merges (the first: {first!r}, id {vocab[first]}); the merges are truncated, empty "
            "or from another vocabulary"
        )


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a leading BOM (some editors write one) is no text
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
    """merges.txt: optional '#version' header, then 'left right' per line in rank order; blank lines and a leading
    byte-order mark ignored.

    With `vocab`, every merge's parts and result must be vocabulary tokens (checked again, with the file and line
    named, when a Tokenizer is built from a directory).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # a leading BOM is not part of line 1
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
    vocab, merges, _ = _read_tokenizer_json(Path(path))
    return vocab, merges


def _read_tokenizer_json(
    path: Path, check: bool = True
) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    """read_tokenizer_json, plus its added tokens (content -> id); check=False skips the vocab/merges checks (for a
    file about to be compared with ones already checked)."""
    data = _read_json(path)
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
    added: dict[str, int] = {}
    for i, t in enumerate(data.get("added_tokens") or []):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not isinstance(t.get("id"), int):
            raise AquilaError(f"{path}: added_tokens[{i}] must be an object with a string content and an integer id")
        added[t["content"]] = t["id"]
    # A saved tokenizer.json may carry the appended specials in model.vocab too; keep the base entries only.
    vocab = {t: i for t, i in vocab.items() if t not in SPECIAL_TOKENS}
    if check:
        check_vocab(vocab, str(path))
        check_merges(merges, vocab, str(path))
    return vocab, merges, added


def check_tokenizer_json_matches(
    path: str | os.PathLike, vocab: dict[str, int], merges: Sequence[tuple[str, str]]
) -> None:
    """A tokenizer.json beside vocab.json + merges.txt must hold the same tokenizer: FlagAI (and aquila) read
    merges.txt, transformers reads tokenizer.json, so two different tokenizers there would give two different ids.

    It is read and checked like merges.txt (a broken one is an error, never skipped); its model must have the same
    vocabulary and merges in the same order, and its added tokens Aquila's special ids.
    """
    path = Path(path)
    their_vocab, their_merges, added = _read_tokenizer_json(path, check=False)  # equal to checked ones, or an error
    fix = "; rewrite the directory with save_pretrained, or remove the file that is wrong"
    where = f"{path} does not match vocab.json + merges.txt beside it"
    if their_vocab != vocab:
        ours = sorted(vocab, key=vocab.__getitem__)
        token = next((t for t in ours if their_vocab.get(t) != vocab[t]), None)
        if token is None:
            extra = min(set(their_vocab) - set(vocab), key=their_vocab.__getitem__)
            detail = f"its model.vocab has {extra!r} (id {their_vocab[extra]}), which vocab.json has not"
        elif token not in their_vocab:
            detail = f"vocab.json entry {token!r} (id {vocab[token]}) is not in its model.vocab"
        else:
            detail = f"{token!r} is id {their_vocab[token]} there, {vocab[token]} in vocab.json"
        raise AquilaError(f"{where}: {detail}{fix}")
    if list(their_merges) != list(merges):
        k = next((k for k, (a, b) in enumerate(zip(their_merges, merges)) if a != b), None)
        if k is None:
            detail = f"it has {len(their_merges):,} merges, merges.txt {len(merges):,}"
        else:
            (a, b), (c, d) = their_merges[k], merges[k]
            detail = f"merge {k + 1} is {a!r} {b!r} there, {c!r} {d!r} in merges.txt"
        raise AquilaError(f"{where}: {detail}{fix}")
    base = len(vocab)
    expected = {t: base + i for i, t in enumerate(SPECIAL_TOKENS)}
    if ENDOFTEXT in vocab:
        expected[ENDOFTEXT] = vocab[ENDOFTEXT]
    for token, id_ in added.items():
        if token in expected and id_ != expected[token]:
            raise AquilaError(
                f"{where}: added token {token!r} is id {id_} there, but {expected[token]} by Aquila's rule "
                f"(the 8 specials follow the {base:,} base entries){fix}"
            )


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
