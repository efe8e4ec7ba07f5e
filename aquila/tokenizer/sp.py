"""LLaMA-style sentencepiece tokenizer with the same interface as `aquila.tokenizer.Tokenizer`.

Chosen by `Tokenizer.from_pretrained` when the directory holds `spiece.model` or `tokenizer.model` (FlagAI's rule).
Ids come from the model: BOS/EOS/UNK/PAD are its control pieces (PAD falls back to UNK when the model has none,
as Aquila's pad == unk). FlagAI's GLM command tokens (sop, eop, MASK, gMASK, sMASK) exist only if the model has
pieces with those names. Sentencepiece normalises text (by default NFKC and whitespace folding), so unlike the
byte-level BPE its round trip is not byte-exact; control-piece strings in the input are never split out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from aquila.errors import AquilaError
from aquila.tokenizer.base import COMMAND_TOKENS, BaseTokenizer, encodable_text


class SentencePieceTokenizer(BaseTokenizer):
    """A `.model` file behind FlagAI's tokenizer API (see the module docstring for how ids are chosen)."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        self.model_file = Path(model_file)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.model_file))
        except (OSError, RuntimeError) as e:
            raise AquilaError(f"{self.model_file} is not a sentencepiece model ({str(e).splitlines()[0]})") from None
        sp = self._sp
        self._size = sp.get_piece_size()
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise AquilaError(
                f"{self.model_file}: the sentencepiece model has no BOS/EOS pieces (encode_plus needs them)"
            )
        self.token_start_id = sp.bos_id()
        self.token_end_id = sp.eos_id()
        self.token_unk_id = sp.unk_id()
        self.token_pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id()
        self._command_ids = {
            "pad": self.token_pad_id,
            "eos": self.token_end_id,
            "unk": self.token_unk_id,
            "cls": self.token_start_id,
            "sep": self.token_end_id,
        }
        for name in ("sop", "eop", "MASK", "gMASK", "sMASK"):
            id_ = sp.piece_to_id(COMMAND_TOKENS[name])
            if id_ != sp.unk_id():
                self._command_ids[name] = id_
        self._control = {i for i in range(self._size) if sp.is_control(i)}
        self.split_special_tokens = False

    def __len__(self) -> int:
        return self._size

    def get_vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._size)}

    def _encode(self, text: str | list[str], **kwargs):
        try:
            return self._sp.encode(text, **kwargs)
        except (UnicodeEncodeError, TypeError, RuntimeError):  # lone surrogates
            if isinstance(text, list):
                return self._sp.encode([encodable_text(t) for t in text], **kwargs)
            return self._sp.encode(encodable_text(text), **kwargs)

    def encode(self, text: str) -> list[int]:
        return self._encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans (sentencepiece reports byte spans of the input; converted here)."""
        proto = self._encode(text, return_type="proto")
        text = encodable_text(text)
        char_of_byte: list[int] = []  # byte offset -> index of the character that byte belongs to
        for i, ch in enumerate(text):
            char_of_byte += [i] * len(ch.encode("utf-8"))
        char_of_byte.append(len(text))
        ids, spans = [], []
        for piece in proto.pieces:
            # A span that starts or ends inside a character (byte fallback) covers that whole character.
            start = char_of_byte[min(piece.begin, len(char_of_byte) - 1)]
            end = char_of_byte[min(piece.end, len(char_of_byte)) - 1] + 1 if piece.end > 0 else 0
            ids.append(piece.id)
            spans.append((start, max(start, min(end, len(text)))))
        return ids, spans

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Control pieces (BOS/EOS/...) render as their piece strings unless skipped; unknown ids are dropped."""
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):  # numpy/torch integers accepted
            if not 0 <= i < self._size:
                continue
            if i in self._control:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]
