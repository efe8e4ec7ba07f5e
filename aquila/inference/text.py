"""Generated ids -> text that is safe to show while generating, with stop strings."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class TextAssembler:
    """Generated ids -> text, with stop strings; hands out pieces that are safe to show.

    A piece never ends inside a multi-byte character (while the decode of the ids so far ends in U+FFFD that
    tail is held back) nor in a prefix of a stop string, so `"".join(pieces)` equals the final text.
    `strip` drops leading and trailing whitespace (trailing whitespace is held back until more text follows).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), strip: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.strip = strip
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found: the text is final

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; returns the newly safe text (maybe "")."""
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)  # never show [CLS] etc.
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.stopped = text[: min(hits)], True
        self.text = text.lstrip() if self.strip else text
        if self.stopped:
            return self.finish()
        safe = len(self.text)
        while safe and self.text[safe - 1] == REPLACEMENT:
            safe -= 1
        safe -= self._stop_prefix_len(self.text[:safe])
        if self.strip:
            safe = len(self.text[:safe].rstrip())
        return self._emit(max(safe, self.emitted))

    def finish(self) -> str:
        """The rest of the text, once generation has ended."""
        if self.strip:
            self.text = self.text.rstrip()
        return self._emit(max(len(self.text), self.emitted))

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = upto
        return piece
