"""FlagAI's `flagai.data.tokenizer`: the one Tokenizer, re-exported."""

from aquila.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
