"""What every tokenizer offers (FlagAI's API as a Protocol), Aquila's special tokens, GPT-2's byte table and text
clean-up.

Text that is not valid Unicode scalar values (lone surrogates, e.g. from a broken JSON "\\ud83d" escape) cannot be
UTF-8 encoded; tokenizers encode each lone surrogate as U+FFFD (`encodable_text`), so `decode(encode(s)) == s` holds
for every string without lone surrogates, and for others with each surrogate replaced by U+FFFD.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from aquila.errors import AquilaError

ENDOFTEXT = "<|endoftext|>"
# The 8 tokens appended after the base vocabulary, in id order (Aquila-7B: 100000..100007).
SPECIAL_TOKENS = ("<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]", "[sMASK]", "[CLS]", "</s>")
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
_SURROGATE = re.compile("[\ud800-\udfff]")


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


def encodable_text(text: object) -> str:
    """`text` with each lone surrogate replaced by U+FFFD; anything but a str is an AquilaError."""
    if not isinstance(text, str):
        raise AquilaError(f"tokenizer input must be str, got {type(text).__name__}")
    return _SURROGATE.sub("\ufffd", text)


class BaseTokenizer(Protocol):
    """FlagAI's tokenizer API. The BPE and sentencepiece tokenizers subclass it for `encode_plus` and
    `get_command_id`; anything with these members (e.g. a test double) can stand in for them."""

    token_start_id: int
    token_end_id: int
    token_unk_id: int
    token_pad_id: int
    _command_ids: dict[str, int]

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]: ...
    def get_vocab(self) -> dict[str, int]: ...
    def __len__(self) -> int: ...

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
