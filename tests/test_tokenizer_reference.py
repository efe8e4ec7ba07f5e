"""An independent, slow, pure-Python GPT-2 byte-level BPE, and tests that aquila.tokenizer gives the same ids.

The reference reads FlagAI's vocab.json / merges.txt itself; nothing is shared with aquila.tokenizer except the
file layout. bench/tokenizer.py also imports it (by path) to measure the speed ratio.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    import regex
except ImportError:  # pragma: no cover - regex ships with transformers
    regex = None

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "aquila" / "demo_tokenizer"

# GPT-2's pre-tokenisation pattern: contractions, optional-space letter runs, number runs, other-symbol runs,
# whitespace not followed by non-space, remaining whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_byte_table() -> dict[int, str]:
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


class ReferenceBPE:
    """Textbook GPT-2 BPE: split with the regex, map bytes to symbols, repeatedly merge the lowest-ranked pair."""

    def __init__(self, directory: Path) -> None:
        self.vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")
        pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        self.ranks = {pair: rank for rank, pair in enumerate(pairs)}
        self.byte_table = gpt2_byte_table()
        self.pattern = regex.compile(GPT2_PATTERN)
        self.cache: dict[str, list[str]] = {}

    def bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(ranked)
            if rank == float("inf"):
                break
            a, b = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the pair, left to right
                if j + 1 < len(parts) and parts[j] == a and parts[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            symbols = "".join(self.byte_table[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[t] for t in self.bpe(symbols)]
        return ids


MIXED = [
    "中华人民共和国国务院总理在北京人民大会堂会见了来访的客人。",
    "The government said on Tuesday that it's going to review the plans, they'll decide.",
    "def f(x):\r\n    return x ** 2  # 平方\n\n\tprint('ok')\n",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 family, café naïve résumé",
    "数字 12345 and 3.14159, 第１２月３１日电（记者）",
    "special strings stay text: <|endoftext|> [CLS] </s> [gMASK]",
    "   leading and trailing spaces   \n\n\n",
    "odd spaces:\x1c\x1d\x1e\x1f\x85\xa0\u2028\u2029\u3000\u200b|\x0b\x0c end \U0001f600\U000e0001",
    "",
]


@pytest.fixture(scope="module")
def demo():
    from aquila.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(DEMO), ReferenceBPE(DEMO)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small FlagAI-layout tokenizer trained in the test on mixed text."""
    from aquila.tokenizer import Tokenizer
    from aquila.tokenizer.train import train_bpe

    d = tmp_path_factory.mktemp("small_tok")
    train_bpe(MIXED * 20, vocab_size=400, min_frequency=1).save_pretrained(d)
    return Tokenizer.from_pretrained(d), ReferenceBPE(d)


@pytest.mark.skipif(regex is None, reason="the reference needs the `regex` module")
@pytest.mark.parametrize("text", MIXED)
def test_same_ids_as_reference_on_mixed_text(demo, small, text):
    for tok, ref in (demo, small):
        assert tok.encode(text) == ref.encode(text)


@pytest.mark.skipif(regex is None, reason="the reference needs the `regex` module")
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_same_ids_as_reference_on_random_text(demo, small, text):
    for tok, ref in (demo, small):
        assert tok.encode(text) == ref.encode(text)


@pytest.mark.skipif(regex is None, reason="the reference needs the `regex` module")
@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(MIXED[:-1]), max_size=4), st.text(alphabet=" \n\t\r'", max_size=5))
def test_same_ids_as_reference_on_concatenations(demo, text_parts, glue):
    tok, ref = demo
    text = glue.join(text_parts)
    assert tok.encode(text) == ref.encode(text)
