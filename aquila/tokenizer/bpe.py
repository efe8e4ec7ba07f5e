"""Aquila's bilingual byte-level BPE tokenizer, file- and id-compatible with FlagAI's.

The algorithm is GPT-2's byte-level BPE (byte->unicode table, GPT-2 pre-tokenisation regex, no prefix space), run
by Hugging Face `tokenizers`. Special ids follow the base vocabulary (base = number of vocab.json entries, 100000
for Aquila-7B):

    <|endoftext|>  vocab id (0 in Aquila)   pad, unk, and FlagAI's "eos" command
    <|startofpiece|> base+0   <|endofpiece|> base+1   <|LDWANG|> base+2 (reserved)
    [MASK] base+3   [gMASK] base+4   [sMASK] base+5   [CLS] base+6 (BOS)   </s> base+7 (EOS)

They never depend on special_tokens_map.json (FlagAI's ids degenerated without it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from aquila.errors import AquilaError
from aquila.io_utils import write_text_atomic
from aquila.tokenizer.base import (  # noqa: F401 (bytes_to_unicode is re-exported from here, as before)
    COMMAND_TOKENS,
    ENDOFTEXT,
    SPECIAL_TOKENS,
    BaseTokenizer,
    bytes_to_unicode,
    encodable_text,
)
from aquila.tokenizer.fast import rank_encoder
from aquila.tokenizer.files import (
    SP_MODEL_FILES,
    added_token,
    check_merges,
    check_tokenizer_json_matches,
    check_vocab,
    read_merges_txt,
    read_tokenizer_json,
    read_vocab_json,
    tokenizer_file,
    write_flagai_files,
)


class Tokenizer(BaseTokenizer):
    """Byte-level BPE over Hugging Face `tokenizers`, with Aquila's special ids.

    vocab: base vocabulary token -> id, ids exactly 0..len-1; merges: pairs in rank order.
    split_special_tokens: False (default, Aquila-7B-era FlagAI) encodes special-token strings found in text as
    ordinary text; True turns them into their special ids like FlagAI after Aug 2023 (but keeps the surrounding
    whitespace, which FlagAI stripped, so decode(encode(s)) == s still holds).
    fast: encode with tiktoken where it gives the same ids (`aquila.tokenizer.fast`; `encoder` says which one runs,
    `fallback_reason` why not tiktoken); False keeps every encode on tokenizers, the reference.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        split_special_tokens: bool = False,
        source: str = "vocabulary",
        fast: bool = True,
    ) -> None:
        check_vocab(vocab, source)
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
        self._fast, self.fallback_reason = None, "fast=False"
        if fast:
            self._fast, self.fallback_reason = rank_encoder(self.vocab, self.merges, backend.model, self.special_ids)
        self._byte_lengths = None  # per-id UTF-8 byte counts, for encode_with_offsets on the fast path

        self._command_ids = {name: self.special_ids[tok] for name, tok in COMMAND_TOKENS.items()}
        self.token_start_id = self.special_ids["[CLS]"]
        self.token_end_id = self.special_ids["</s>"]
        self.token_unk_id = self.token_pad_id = self.special_ids[ENDOFTEXT]

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, split_special_tokens: bool = False, fast: bool = True
    ) -> BaseTokenizer:
        """FlagAI's entry point: the tokenizer in `directory` (BPE or sentencepiece, see `load_tokenizer`)."""
        return load_tokenizer(directory, split_special_tokens=split_special_tokens, fast=fast)

    @property
    def split_special_tokens(self) -> bool:
        return self._split

    @split_special_tokens.setter
    def split_special_tokens(self, value: bool) -> None:
        self._split = bool(value)
        # tokenizers' flag means "encode special-token text as ordinary text", the opposite of ours.
        self._backend.encode_special_tokens = not value

    @property
    def encoder(self) -> str:
        """Which library encodes: "tiktoken" (fast path) or "tokenizers" (the reference; see fallback_reason)."""
        return "tokenizers" if self._fast is None else "tiktoken"

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
        if self._fast is not None:
            return self._fast.encode(text, self._split)
        # The batch entry point skips computing offsets: ~25% faster than backend.encode, still one thread.
        try:
            return self._backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        except TypeError:
            return self._backend.encode_batch_fast([encodable_text(text)], add_special_tokens=False)[0].ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of many texts on all cores."""
        texts = list(texts)
        if self._fast is not None:
            return self._fast.encode_batch(texts, self._split)
        try:
            encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            encodings = self._backend.encode_batch_fast([encodable_text(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """encode() of many texts as integer arrays, in this thread: `aquila preprocess`'s workers (one per core)
        skip a Python int per token (uint32 from tiktoken; int64 from tokenizers)."""
        if self._fast is not None:
            return self._fast.encode_arrays(texts, self._split)
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per token, the (start, end) character span of `text` it came from.

        A character split over several byte-level tokens (e.g. an emoji) gives each of them that character's span.
        """
        if self._fast is not None:
            return self._fast_offsets(text)
        try:
            enc = self._backend.encode(text, add_special_tokens=False)
        except TypeError:
            enc = self._backend.encode(encodable_text(text), add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def _fast_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Spans from each token's byte count: a token covering bytes [s, e) spans the characters holding s and e-1."""
        if self._byte_lengths is None:
            lengths = np.zeros(len(self), dtype=np.int64)
            for token, id_ in self.vocab.items():
                lengths[id_] = len(token)  # one byte symbol per byte (<|endoftext|> is ASCII)
            for token, id_ in self.special_ids.items():
                lengths[id_] = len(token.encode("utf-8"))
            self._byte_lengths = lengths
        text = encodable_text(text)
        ids = self._fast.encode(text, self._split)
        if not ids:
            return ids, []
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        char_of_byte = np.cumsum((data & 0xC0) != 0x80) - 1  # continuation bytes belong to the character before
        ends = np.cumsum(self._byte_lengths[ids])
        starts = ends - self._byte_lengths[ids]
        spans = np.stack([char_of_byte[starts], char_of_byte[ends - 1] + 1], axis=1)
        return ids, [tuple(s) for s in spans.tolist()]

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
        write_flagai_files(d, self.vocab, self.merges)
        write_text_atomic(d / "tokenizer.json", self._backend.to_str(pretty=False) + "\n")
        write_text_atomic(d / "tokenizer_config.json", json.dumps(self._tokenizer_config(), indent=2) + "\n")

    def _tokenizer_config(self) -> dict:
        added = {
            str(id_): added_token(tok, special=True)
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


def load_tokenizer(
    directory: str | os.PathLike, split_special_tokens: bool = False, fast: bool = True
) -> BaseTokenizer:
    """The tokenizer in `directory`, its class chosen by the files present (`files.tokenizer_file`), like FlagAI.
    `fast` (BPE only): tiktoken where it gives the same ids, see `Tokenizer`."""
    path = tokenizer_file(directory)
    if path is None:
        raise AquilaError(
            f"{directory} has no tokenizer files (expected vocab.json + merges.txt, tokenizer.json, spiece.model or tokenizer.model)"
        )
    if path.name in SP_MODEL_FILES:
        from aquila.tokenizer.sp import SentencePieceTokenizer  # sentencepiece is imported only when needed

        return SentencePieceTokenizer(path)
    if path.name == "merges.txt":
        vocab = read_vocab_json(path.parent / "vocab.json")
        merges = read_merges_txt(path, vocab=vocab)
        if (path.parent / "tokenizer.json").is_file():  # merges.txt decides (FlagAI's rule); the other must agree
            check_tokenizer_json_matches(path.parent / "tokenizer.json", vocab, merges)
    else:
        vocab, merges = read_tokenizer_json(path)
    return Tokenizer(vocab, merges, split_special_tokens=split_special_tokens, source=str(path), fast=fast)
