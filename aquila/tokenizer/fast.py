"""A `tiktoken` encoder that gives a byte-level BPE's ids ~3x faster than `tokenizers`, when it provably can.

tiktoken merges, inside each pre-tokenised piece, the adjacent pair whose concatenated bytes have the lowest rank
(and takes a whole piece that is a token as that token). BPE with a merges list merges the adjacent pair with the
lowest *merge* rank. With ranks = ids the two agree when (checked by `rank_encoder`, else it returns the reason):

1. every vocabulary entry but <|endoftext|> is a byte symbol or made by exactly one merge, and the merges' result ids
   increase with the merge rank (a trained BPE numbers its tokens in merge order: Aquila-7B, GPT-2, ours);
2. every merge result encodes to itself from its own bytes under the merges (checked with `tokenizers`).

Why 2 suffices: in any state of BPE on a word, two adjacent tokens x, y whose concatenation t is a token made by
another merge cover a region whose merges so far are those of BPE on t alone; that one ends in [t], so it never
stops at [x, y] and nor does the word, and there are no such pairs for tiktoken to merge out of turn. For the same
reason a piece that is itself a token encodes to that token either way.

The pre-tokenisation is GPT-2's pattern (FlagAI's), which tiktoken's regex engine and tokenizers' classify alike on
every code point (tested).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from aquila.tokenizer.base import ENDOFTEXT, bytes_to_unicode, encodable_text

# GPT-2's pre-tokenisation (contractions, optional-space letter/number/symbol runs, whitespace), as tiktoken's
# r50k pattern spells it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SURROGATE = re.compile("[\ud800-\udfff]")
_SYMBOLS = frozenset(bytes_to_unicode().values())
_SYMBOL_TO_LATIN1 = {ord(ch): b for b, ch in bytes_to_unicode().items()}  # str.translate: symbol -> chr(byte)


def _clean(text: str) -> str:
    """`encodable_text` for the rare text with lone surrogates; ASCII is known clean without a scan."""
    if not isinstance(text, str) or (not text.isascii() and _SURROGATE.search(text)):
        return encodable_text(text)
    return text


def _threads() -> int:
    """Threads for a batch: one where TOKENIZERS_PARALLELISM=false (preprocess workers, one process per core, set
    it, as HF tokenizers honours it), else every core this process may use."""
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0", "off", "no"):
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _buffer_encoder(encoding):
    """tiktoken's encoder to a uint32 buffer, without a Python int per token (what its encode_to_numpy calls, minus
    that method's scan of the text for disallowed specials); None where a tiktoken lacks it."""
    return getattr(getattr(encoding, "_core_bpe", None), "encode_to_tiktoken_buffer", None)


class RankEncoder:
    """Encode with tiktoken; ids as the BPE's (see the module docstring), specials split out only on request."""

    def __init__(self, encoding, specials: dict[str, int]) -> None:
        self._encoding = encoding
        self._specials = frozenset(specials)

    def encode(self, text: str, split_special_tokens: bool) -> list[int]:
        core = getattr(self._encoding, "_core_bpe", None)
        if core is not None and isinstance(text, str):
            # What Encoding.encode/encode_ordinary call, without their own surrogate fix (not encodable_text's:
            # it would join a surrogate pair); a text with lone surrogates fails UTF-8 conversion and is cleaned.
            try:
                return core.encode(text, self._specials) if split_special_tokens else core.encode_ordinary(text)
            except UnicodeEncodeError:
                return self.encode(encodable_text(text), split_special_tokens)
        text = _clean(text)
        if split_special_tokens:
            return self._encoding.encode(text, allowed_special=self._specials)
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], split_special_tokens: bool) -> list[list[int]]:
        texts = [_clean(t) for t in texts]
        threads = min(_threads(), max(1, len(texts)))
        if split_special_tokens:
            return self._encoding.encode_batch(texts, num_threads=threads, allowed_special=self._specials)
        return self._encoding.encode_ordinary_batch(texts, num_threads=threads)

    def encode_arrays(self, texts: Sequence[str], split_special_tokens: bool) -> list[np.ndarray]:
        """`encode` of each text as a uint32 array, in this thread (for one-process-per-core workers).

        Specials outside the allowed set are plain text to tiktoken's core (it only splits out allowed ones), so
        an empty set gives `encode_ordinary`'s ids. Lone surrogates fail its UTF-8 conversion: those texts (rare)
        are cleaned and encoded again, instead of scanning every text first."""
        to_buffer = _buffer_encoder(self._encoding)
        if to_buffer is None:
            return [np.asarray(self.encode(t, split_special_tokens), dtype=np.uint32) for t in texts]
        allowed = self._specials if split_special_tokens else frozenset()
        out = []
        for text in texts:
            if not isinstance(text, str):
                text = encodable_text(text)  # AquilaError naming the type
            try:
                buffer = to_buffer(text, allowed)
            except UnicodeEncodeError:
                buffer = to_buffer(encodable_text(text), allowed)
            out.append(np.frombuffer(buffer, dtype=np.uint32))
        return out


def rank_encoder(
    vocab: dict[str, int], merges: Sequence[tuple[str, str]], model: models.BPE, specials: dict[str, int]
) -> tuple[RankEncoder | None, str | None]:
    """A tiktoken encoder giving exactly `model`'s ids for this vocabulary, or (None, why it would not)."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    made: dict[str, int] = {}
    last = -1
    for rank, (a, b) in enumerate(merges):
        token = a + b
        if token in made:
            return None, f"merges {made[token] + 1} and {rank + 1} both make {token!r}"
        made[token] = rank
        if vocab[token] <= last:
            return None, f"merge {rank + 1} ({a!r} {b!r}) makes id {vocab[token]}, below the previous merge's {last}"
        last = vocab[token]
    tokens = [t for t in vocab if t != ENDOFTEXT]
    if not set("".join(tokens)) <= _SYMBOLS:
        token = next(t for t in tokens if not set(t) <= _SYMBOLS)
        return None, f"vocabulary entry {token!r} (id {vocab[token]}) is not a byte-level string"
    if not _SYMBOLS <= set(vocab):
        return None, f"the vocabulary lacks byte symbol {min(_SYMBOLS - set(vocab))!r}"
    if len(tokens) != len(_SYMBOLS) + len(made):  # Tokenizer's check_merges rules this out; tiktoken would use them
        return None, "some vocabulary entries are neither byte symbols nor made by a merge"
    ranks = {t.translate(_SYMBOL_TO_LATIN1).encode("latin-1"): vocab[t] for t in tokens}
    word = _first_not_made_whole(list(made), vocab, model)
    if word is not None:
        return None, f"merge result {word!r} (id {vocab[word]}) does not encode to itself from its own bytes"
    encoding = tiktoken.Encoding("aquila-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return RankEncoder(encoding, specials), None


def _first_not_made_whole(words: list[str], vocab: dict[str, int], model: models.BPE, chunks: int = 16) -> str | None:
    """The first of `words` that `model`'s merges do not turn into that one token, or None.

    The words go through the same model (shared, not copied) in a few space-joined chunks, split on whitespace: no
    byte symbol is whitespace, and one call per chunk is ~2x faster than one Encoding per word.
    """
    whole = HFTokenizer(model)
    whole.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    parts = [words[i::chunks] for i in range(chunks)]
    encodings = whole.encode_batch_fast([" ".join(p) for p in parts], add_special_tokens=False)
    for part, encoding in zip(parts, encodings):
        want = [vocab[w] for w in part]
        if encoding.ids != want:
            return next((w for w, got, id_ in zip(part, encoding.ids, want) if got != id_), part[-1])
    return None
