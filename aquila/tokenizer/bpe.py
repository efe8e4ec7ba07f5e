"""Aquila's bilingual byte-level BPE tokenizer, file- and id-compatible with FlagAI's.

Files: FlagAI's `vocab.json` + `merges.txt` (GPT-2 layout, as written by Hugging Face `tokenizers`), optionally
`special_tokens_map.json`; or a `tokenizer.json`. The algorithm is GPT-2's byte-level BPE (byte->unicode table,
GPT-2 pre-tokenisation regex, no prefix space), run by Hugging Face `tokenizers`.

Special ids follow the base vocabulary (base = number of vocab.json entries, 100000 for Aquila-7B):

    <|endoftext|>  vocab id (0 in Aquila)   pad, unk, and FlagAI's "eos" command
    <|startofpiece|> base+0   <|endofpiece|> base+1   <|LDWANG|> base+2 (reserved)
    [MASK] base+3   [gMASK] base+4   [sMASK] base+5   [CLS] base+6 (BOS)   </s> base+7 (EOS)

They never depend on special_tokens_map.json (FlagAI's ids degenerated without it).

Text that is not valid Unicode scalar values (lone surrogates, e.g. from a broken JSON "\\ud83d" escape) cannot be
UTF-8 encoded; each lone surrogate is encoded as U+FFFD, so `decode(encode(s)) == s` holds for every string
without lone surrogates, and for others with each surrogate replaced by U+FFFD.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from aquila.errors import AquilaError
from aquila.io_utils import write_text_atomic

ENDOFTEXT = "<|endoftext|>"
# The 8 tokens appended after the base vocabulary, in id order (Aquila-7B: 100000..100007).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|startofpiece|>",
    "<|endofpiece|>",
    "<|LDWANG|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "[CLS]",
    "</s>",
)
# FlagAI's get_command_id names -> token string. "eos" is the document separator <|endoftext|> (id 0), while the
# sequence end appended by encode_plus is "sep" = </s> (token_end_id).
COMMAND_TOKENS: dict[str, str] = {
    "pad": ENDOFTEXT,
    "eos": ENDOFTEXT,
    "unk": ENDOFTEXT,
    "sop": "<|startofpiece|>",
    "eop": "<|endofpiece|>",
    "MASK": "[MASK]",
    "gMASK": "[gMASK]",
    "sMASK": "[sMASK]",
    "cls": "[CLS]",
    "sep": "</s>",
}
MERGES_HEADER = "#version: 0.2"
SP_MODEL_FILES = ("spiece.model", "tokenizer.model")
# Every file a tokenizer directory may hold; model directories carry them beside the weights.
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    *SP_MODEL_FILES,
)
_SURROGATE = re.compile("[\ud800-\udfff]")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy whichever tokenizer files `src` has into `dst` (model conversions keep the tokenizer beside weights)."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _replace_surrogates(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


class BaseTokenizer:
    """What the BPE and sentencepiece tokenizers share: FlagAI's encode_plus, command ids and attributes.

    Subclasses set `token_start_id`, `token_end_id`, `token_unk_id`, `token_pad_id`, `_command_ids` and implement
    `encode`, `encode_batch`, `decode`, `decode_batch`, `encode_with_offsets`, `get_vocab`, `__len__`.
    """

    token_start_id: int
    token_end_id: int
    token_unk_id: int
    token_pad_id: int
    _command_ids: dict[str, int]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, split_special_tokens: bool = False) -> BaseTokenizer:
        """Load from a directory, choosing the class by the files present, like FlagAI.

        `spiece.model` / `tokenizer.model` -> sentencepiece; `merges.txt` (+ `vocab.json`) or `tokenizer.json` -> BPE.
        """
        d = Path(directory)
        if not d.is_dir():
            raise AquilaError(f"tokenizer directory {d} does not exist")
        for name in SP_MODEL_FILES:
            if (d / name).is_file():
                from aquila.tokenizer.sp import SentencePieceTokenizer

                return SentencePieceTokenizer(d / name)
        vocab_path, merges_path, json_path = d / "vocab.json", d / "merges.txt", d / "tokenizer.json"
        if merges_path.is_file():
            if not vocab_path.is_file():
                raise AquilaError(f"{merges_path} has no vocab.json beside it")
            vocab = read_vocab_json(vocab_path)
            merges = read_merges_txt(merges_path, vocab=vocab)
            return Tokenizer(vocab, merges, split_special_tokens=split_special_tokens, source=str(merges_path))
        if json_path.is_file():
            vocab, merges = read_tokenizer_json(json_path)
            return Tokenizer(vocab, merges, split_special_tokens=split_special_tokens, source=str(json_path))
        if vocab_path.is_file():
            raise AquilaError(f"{d} has vocab.json but no merges.txt (a BPE tokenizer needs both, or tokenizer.json)")
        raise AquilaError(
            f"{d} has no tokenizer files (expected vocab.json + merges.txt, tokenizer.json, spiece.model or tokenizer.model)"
        )

    # --- to implement -------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        raise NotImplementedError

    def get_vocab(self) -> dict[str, int]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------------
    def get_command_id(self, name: str) -> int:
        """FlagAI's command-token ids by name: pad, eos, unk, sop, eop, MASK, gMASK, sMASK, cls, sep."""
        try:
            return self._command_ids[name]
        except KeyError:
            raise AquilaError(
                f"unknown command token {name!r}; this tokenizer has {', '.join(self._command_ids)}"
            ) from None

    def encode_plus(
        self, text: str, second_text: str | None = None, truncation: bool = True, max_length: int | None = None
    ) -> dict[str, list[int]]:
        """FlagAI's encode_plus: [BOS] + a + [EOS] (+ b + [EOS]), all-zero token_type_ids.

        With truncation and max_length, tokens are dropped from the end of the longer part (before its EOS) until
        the total fits, as FlagAI's truncate_sequence does.
        """
        first = [self.token_start_id, *self.encode(text), self.token_end_id]
        second = [*self.encode(second_text), self.token_end_id] if second_text is not None else []
        if truncation and max_length is not None:
            minimum = 2 + (1 if second_text is not None else 0)
            if max_length < minimum:
                raise AquilaError(f"max_length={max_length} cannot hold the {minimum} BOS/EOS tokens of encode_plus")
            while len(first) + len(second) > max_length:
                longer = first if len(first) - 2 >= len(second) - 1 else second
                longer.pop(-2)
        ids = first + second
        return {"input_ids": ids, "token_type_ids": [0] * len(ids)}


class Tokenizer(BaseTokenizer):
    """Byte-level BPE over Hugging Face `tokenizers`, with Aquila's special ids.

    vocab: base vocabulary token -> id, ids exactly 0..len-1; merges: pairs in rank order.
    split_special_tokens: False (default, Aquila-7B-era FlagAI) encodes special-token strings found in text as
    ordinary text; True turns them into their special ids like FlagAI after Aug 2023 (but keeps the surrounding
    whitespace, which FlagAI stripped, so decode(encode(s)) == s still holds).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        split_special_tokens: bool = False,
        source: str = "vocabulary",
    ) -> None:
        _check_vocab(vocab, source)
        if ENDOFTEXT not in vocab:
            raise AquilaError(f"{source}: the vocabulary has no {ENDOFTEXT} entry (Aquila's pad/unk token)")
        for token in SPECIAL_TOKENS:
            if token in vocab:
                raise AquilaError(f"{source}: special token {token} must not be in the base vocabulary")
        self.vocab = dict(vocab)
        self.merges = [(a, b) for a, b in merges]
        check_merges(self.merges, self.vocab, source)
        self.base_size = len(vocab)
        self.special_ids = {tok: self.base_size + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_ids[ENDOFTEXT] = vocab[ENDOFTEXT]

        backend = HFTokenizer(models.BPE(self.vocab, self.merges, unk_token=None, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        # Added in id order: <|endoftext|> keeps its vocab id, the other 8 get base+0..base+7.
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, *SPECIAL_TOKENS)]
        )
        for token, id_ in self.special_ids.items():
            if backend.token_to_id(token) != id_:  # pragma: no cover - guards against a tokenizers behaviour change
                raise AquilaError(
                    f"{source}: special token {token} got id {backend.token_to_id(token)}, expected {id_}"
                )
        self._backend = backend
        self.split_special_tokens = split_special_tokens

        pad = self.special_ids[ENDOFTEXT]
        self._command_ids = {name: self.special_ids[tok] for name, tok in COMMAND_TOKENS.items()}
        self.token_start_id = self.special_ids["[CLS]"]
        self.token_end_id = self.special_ids["</s>"]
        self.token_unk_id = pad
        self.token_pad_id = pad

    @property
    def split_special_tokens(self) -> bool:
        return not self._backend.encode_special_tokens

    @split_special_tokens.setter
    def split_special_tokens(self, value: bool) -> None:
        # tokenizers' flag means "encode special-token text as ordinary text", the opposite of ours.
        self._backend.encode_special_tokens = not value

    @property
    def backend(self) -> HFTokenizer:
        """The underlying Hugging Face tokenizer (specials included as added tokens)."""
        return self._backend

    def __len__(self) -> int:
        return self.base_size + len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        """The base BPE vocabulary (without the 8 appended specials), as FlagAI returns it."""
        return dict(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        # The batch entry point skips computing offsets: ~25% faster than backend.encode, still one thread.
        try:
            return self._backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        except TypeError:
            return self._backend.encode_batch_fast([_replace_surrogates(_as_str(text))], add_special_tokens=False)[
                0
            ].ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of many texts on all cores."""
        texts = list(texts)
        try:
            encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            encodings = self._backend.encode_batch_fast(
                [_replace_surrogates(_as_str(t)) for t in texts], add_special_tokens=False
            )
        return [e.ids for e in encodings]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per token, the (start, end) character span of `text` it came from.

        A character split over several byte-level tokens (e.g. an emoji) gives each of them that character's span.
        """
        try:
            enc = self._backend.encode(text, add_special_tokens=False)
        except TypeError:
            enc = self._backend.encode(_replace_surrogates(_as_str(text)), add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: special ids render as their strings; ids outside the vocabulary are dropped; byte
        sequences that are not valid UTF-8 decode to U+FFFD (errors='replace')."""
        return self._backend.decode(self._known_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """decode() of many id lists on all cores."""
        return self._backend.decode_batch(
            [self._known_ids(ids) for ids in batch], skip_special_tokens=skip_special_tokens
        )

    def _known_ids(self, ids: Sequence[int]) -> list[int]:
        """Plain ints (numpy/torch integers and tensors accepted) inside the vocabulary; others dropped like FlagAI."""
        size = len(self)
        return [i for i in map(int, ids) if 0 <= i < size]

    def id_to_token(self, id_: int) -> str | None:
        return self._backend.id_to_token(id_)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write FlagAI's files (vocab.json, merges.txt, special_tokens_map.json) and the Hugging Face ones
        (tokenizer.json, tokenizer_config.json), each atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ordered = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        write_text_atomic(d / "vocab.json", json.dumps(ordered, ensure_ascii=False) + "\n")
        write_text_atomic(d / "merges.txt", "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in self.merges)]) + "\n")
        write_text_atomic(d / "special_tokens_map.json", json.dumps(_special_tokens_map(), indent=2) + "\n")
        write_text_atomic(d / "tokenizer.json", self._backend.to_str(pretty=False) + "\n")
        write_text_atomic(d / "tokenizer_config.json", json.dumps(self._tokenizer_config(), indent=2) + "\n")

    def _tokenizer_config(self) -> dict:
        added = {
            str(id_): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for tok, id_ in sorted(self.special_ids.items(), key=lambda kv: kv[1])
        }
        return {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "add_bos_token": False,
            "model_max_length": 2048,
            "bos_token": "[CLS]",
            "eos_token": "</s>",
            "unk_token": ENDOFTEXT,
            "pad_token": ENDOFTEXT,
            "added_tokens_decoder": added,
        }


def load_tokenizer(directory: str | os.PathLike, split_special_tokens: bool = False) -> BaseTokenizer:
    """Same as `Tokenizer.from_pretrained`."""
    return BaseTokenizer.from_pretrained(directory, split_special_tokens=split_special_tokens)


def _as_str(text: object) -> str:
    if not isinstance(text, str):
        raise AquilaError(f"tokenizer input must be str, got {type(text).__name__}")
    return text


def _special_tokens_map() -> dict:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "bos_token": entry("[CLS]"),
        "eos_token": entry("</s>"),
        "unk_token": entry(ENDOFTEXT),
        "pad_token": entry(ENDOFTEXT),
        "cls_token": entry("[CLS]"),
        "sep_token": entry("</s>"),
    }


def _check_vocab(vocab: dict[str, int], source: str) -> None:
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        missing = next((i for i, v in enumerate(ids) if i != v), len(ids))
        raise AquilaError(
            f"{source}: vocabulary ids must be exactly 0..{len(ids) - 1}; id {missing} is missing or repeated"
        )


def read_vocab_json(path: str | os.PathLike) -> dict[str, int]:
    """vocab.json: a JSON object token -> id."""
    path = Path(path)
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AquilaError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise AquilaError(f"{path} is not UTF-8 text") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise AquilaError(f"{path} must be a JSON object mapping token strings to integer ids")
    _check_vocab(vocab, str(path))
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
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise AquilaError(f"{path}:{lineno}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    if vocab is not None:
        check_merges(merges, vocab, str(path), line_numbers=_merge_line_numbers(lines))
    return merges


def _merge_line_numbers(lines: list[str]) -> list[int]:
    """1-based line number of each merge (skipping header and blank lines), for error messages."""
    numbers = []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if line and not (lineno == 1 and line.startswith("#version")):
            numbers.append(lineno)
    return numbers


def check_merges(
    merges: Sequence[tuple[str, str]], vocab: dict[str, int], source: str, line_numbers: list[int] | None = None
) -> None:
    """Every merge must name vocabulary tokens and produce one; the error names the file and line (or index)."""
    for i, (a, b) in enumerate(merges):
        for token in (a, b, a + b):
            if token not in vocab:
                where = f"{source}:{line_numbers[i]}" if line_numbers else f"{source}: merge {i}"
                raise AquilaError(f"{where}: merge {a!r} {b!r} uses {token!r}, which is not in vocab.json")


def read_tokenizer_json(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocab and merges of a Hugging Face tokenizer.json (either merges layout: "a b" or ["a", "b"])."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AquilaError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
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
    _check_vocab(vocab, str(path))
    check_merges(merges, vocab, str(path))
    return vocab, merges
