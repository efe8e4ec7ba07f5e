"""The tiktoken fast path (aquila.tokenizer.fast): the same ids as tokenizers and as the independent FlagAI-style BPE
of test_tokenizer_reference, the same offsets, and the fallback (with its reason) where the ids could differ."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.tokenizer import ENDOFTEXT, SPECIAL_TOKENS, Tokenizer, bytes_to_unicode
from aquila.tokenizer.fast import GPT2_PATTERN
from tests.test_tokenizer_reference import DEMO, MIXED, ReferenceBPE

tiktoken = pytest.importorskip("tiktoken", reason="the fast path needs tiktoken")

# Pieces of mixed-script text, including what stresses the split: contractions, whitespace runs before words and at
# the end, digits next to letters, CJK punctuation, emoji with skin tones and ZWJ, combining marks, special strings.
PIECES = [
    "中华人民共和国", "北京", "，", "。", "（记者）", "１２月", "第", "の", "한국어", "Ελληνικά", "русский", "עברית", "العربية",
    "hello", "World", "it's", "they'll", "I'M", "'ve", "don't", " ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", "\u3000",
    "\xa0", "\u2028", "\x0b", "\x1c", "\x85", "0", "42", "3.14", "1e9", "١٢٣", "def f(x):", "    return", "x**2", "#",
    "{}", "()", "->", "=>", "//", "😀", "👍🏽", "👨‍👩‍👧", "🇨🇳", "e\u0301", "café", "\u200b", "\x00", "\ufffd",
    "<|endoftext|>", "</s>", "[CLS]", "[gMASK]", "<|startofpiece|>", "[MASK]",
]  # fmt: skip
# Random characters assigned by Python's Unicode (14.0 in 3.11): FlagAI's `regex` module, if newer, classifies some
# later-assigned code points differently from both tokenizers and tiktoken (docs/tokenizer.md).
assigned = st.characters(exclude_categories=("Cn", "Cs"))
mixed_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(assigned, max_size=3)), max_size=24).map("".join)


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """(fast, reference) pairs: the committed demo tokenizer and a small one trained here on mixed text."""
    from aquila.tokenizer.train import train_bpe

    small = tmp_path_factory.mktemp("small")
    train_bpe(MIXED * 20 + PIECES * 5, vocab_size=500, min_frequency=1).save_pretrained(small)
    pairs = []
    for d in (DEMO, small):
        fast, ref = Tokenizer.from_pretrained(d), Tokenizer.from_pretrained(d, fast=False)
        assert (fast.encoder, fast.fallback_reason, ref.encoder) == ("tiktoken", None, "tokenizers")
        pairs.append((fast, ref, ReferenceBPE(d)))
    return pairs


def assert_same(pairs, text):
    for fast, ref, flagai in pairs:
        ids = fast.encode(text)
        assert ids == ref.encode(text) == flagai.encode(text)
        assert fast.encode_arrays([text])[0].tolist() == ids == ref.encode_arrays([text])[0].tolist()
        assert fast.decode(ids) == text


@pytest.mark.parametrize("text", [*MIXED, *PIECES, "".join(PIECES), " ".join(PIECES), "\n".join(PIECES[::-1])])
def test_same_ids_on_examples(tokenizers_pair, text):
    assert_same(tokenizers_pair, text)


@settings(max_examples=300, deadline=None)
@given(mixed_text)
def test_same_ids_on_random_mixed_script_text(tokenizers_pair, text):
    assert_same(tokenizers_pair, text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_same_ids_on_random_unicode_and_offsets(tokenizers_pair, text):
    for fast, ref, _ in tokenizers_pair:
        assert fast.encode(text) == ref.encode(text)
        assert fast.encode_with_offsets(text) == ref.encode_with_offsets(text)


@settings(max_examples=100, deadline=None)
@given(mixed_text)
def test_split_special_tokens_mode(tokenizers_pair, text):
    for fast, ref, _ in tokenizers_pair:
        fast.split_special_tokens = ref.split_special_tokens = True
        try:
            assert fast.encode(text) == ref.encode(text) == fast.encode_arrays([text])[0].tolist()
            assert fast.encode_with_offsets(text) == ref.encode_with_offsets(text)
            assert fast.decode(fast.encode(text)) == text
        finally:
            fast.split_special_tokens = ref.split_special_tokens = False


def test_special_strings_stay_text_by_default_and_split_on_request(tokenizers_pair):
    fast, ref, _ = tokenizers_pair[0]
    text = "a </s> b<|endoftext|>[gMASK][CLS]"
    assert not set(fast.encode(text)) & set(fast.special_ids.values())
    split = Tokenizer.from_pretrained(DEMO, split_special_tokens=True)
    assert split.encoder == "tiktoken"
    assert split.encode(text) == [*fast.encode("a "), 16007, *fast.encode(" b"), 0, 16004, 16006]


def test_batch_and_lone_surrogates(tokenizers_pair):
    texts = [*MIXED, "a\ud800b\udfff", "\ud83d\ude00", ""]  # a surrogate *pair* in a str is still two lone ones
    for fast, ref, _ in tokenizers_pair:
        assert fast.encode_batch(texts) == ref.encode_batch(texts) == [ref.encode(t) for t in texts]
        assert fast.encode("\ud83d\ude00") == fast.encode("\ufffd\ufffd")
        assert fast.encode_with_offsets("x\ud800y") == ref.encode_with_offsets("x\ud800y")
        assert [a.tolist() for a in fast.encode_arrays(texts)] == ref.encode_batch(texts)


def test_encode_arrays_without_tiktokens_buffer(tokenizers_pair, monkeypatch):
    """A tiktoken without the buffer entry point: arrays from its lists, the same ids."""
    from aquila.tokenizer import fast as fast_module

    fast, ref, _ = tokenizers_pair[0]
    assert fast_module._buffer_encoder(fast._fast._encoding) is not None  # the other tests ran the buffer path
    monkeypatch.setattr(fast_module, "_buffer_encoder", lambda encoding: None)
    texts = [*MIXED, "a </s> b<|endoftext|>", "x\ud800y", ""]
    assert [a.tolist() for a in fast.encode_arrays(texts)] == ref.encode_batch(texts)


def test_gpt2_pattern_is_flagai_pattern():
    # tests/test_tokenizer_reference.py spells the contractions out; the alternation matches the same strings.
    from tests.test_tokenizer_reference import GPT2_PATTERN as FLAGAI_PATTERN

    regex = pytest.importorskip("regex")
    for text in ["it's 'S 'sd 'll 'lL 've 're 'd 'm 't 'x", *MIXED, *PIECES]:
        assert regex.findall(GPT2_PATTERN, text) == regex.findall(FLAGAI_PATTERN, text)


@pytest.mark.slow
def test_pre_tokenisation_classes_agree_with_tokenizers():
    """tiktoken's regex engine and tokenizers' must put every probed code point in the same class (letter, number,
    other, whitespace): "p" + c is one piece exactly when c joins p's class. tiktoken shows its pieces through a
    vocabulary holding every probe as one token (a whole piece that is a token encodes to it)."""
    from tokenizers import pre_tokenizers

    probes = ("a", "1", "!", "\t")
    points = [*range(0x3000), *range(0x3000, 0x110000, 11)]
    chars = [chr(c) for c in points if not 0xD800 <= c <= 0xDFFF]
    ranks = {bytes([b]): b for b in range(256)}
    for c in chars:
        for p in probes:
            ranks.setdefault((p + c).encode(), len(ranks))
    encoding = tiktoken.Encoding("probe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    hf = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for c in chars:
        for p in probes:
            assert (len(encoding.encode_ordinary(p + c)) == 1) == (len(hf.pre_tokenize_str(p + c)) == 1), (
                p,
                hex(ord(c)),
            )


# --- fallback ---------------------------------------------------------------------------------------------------------


def byte_vocab() -> dict[str, int]:
    vocab = {ENDOFTEXT: 0}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    return vocab


def with_merges(merges: list[tuple[str, str]], order: list[int] | None = None) -> tuple[dict, list]:
    vocab = byte_vocab()
    results = list(dict.fromkeys(a + b for a, b in merges))
    for k in order or range(len(results)):
        vocab[results[k]] = len(vocab)
    return vocab, merges


def test_fallback_when_a_merge_result_does_not_encode_to_itself():
    # "bc" merges before "ab", so BPE never sees "ab" next to "c" in "abc" and gives [a, bc]; tiktoken merging by the
    # rank of the concatenated bytes would join a+bc (and takes the piece "abc", a token, whole).
    vocab, merges = with_merges([("b", "c"), ("a", "b"), ("ab", "c")])
    tok = Tokenizer(vocab, merges)
    assert tok.encoder == "tokenizers"
    assert tok.fallback_reason == "merge result 'abc' (id 259) does not encode to itself from its own bytes"
    assert tok.encode("abc") == [vocab["a"], vocab["bc"]]
    ranks = {k.encode(): v for k, v in vocab.items() if k != ENDOFTEXT}
    naive = tiktoken.Encoding("naive", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert naive.encode_ordinary("abc") == [vocab["abc"]]  # what the check prevents


def test_fallback_when_ids_do_not_follow_merge_order():
    vocab, merges = with_merges([("h", "e"), ("Ġ", "t")], order=[1, 0])
    tok = Tokenizer(vocab, merges)
    assert tok.encoder == "tokenizers"
    assert tok.fallback_reason == "merge 2 ('Ġ' 't') makes id 257, below the previous merge's 258"
    assert tok.encode(" the") == [vocab["Ġt"], vocab["he"]]


def test_fallback_when_two_merges_make_one_token():
    vocab, merges = with_merges([("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")])
    tok = Tokenizer(vocab, merges)
    assert tok.fallback_reason == "merges 3 and 4 both make 'abc'"
    assert tok.encode("abc") == Tokenizer(vocab, merges, fast=False).encode("abc")


def test_fast_false_keeps_the_reference(tmp_path):
    tok = Tokenizer.from_pretrained(DEMO, fast=False)
    assert (tok.encoder, tok.fallback_reason) == ("tokenizers", "fast=False")


def test_trained_tokenizers_take_the_fast_path():
    from aquila.tokenizer.train import train_bpe

    tok = train_bpe(MIXED * 10, vocab_size=400, min_frequency=1)
    assert tok.encoder == "tiktoken", tok.fallback_reason


def test_saved_files_reload_on_the_fast_path(tmp_path):
    Tokenizer.from_pretrained(DEMO).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert [t["id"] for t in data["added_tokens"]] == [0, *range(16000, 16000 + len(SPECIAL_TOKENS))]
    assert Tokenizer.from_pretrained(tmp_path).encoder == "tiktoken"


def test_pickled_tokenizer_keeps_the_fast_path():
    """Spawned worker processes (DataLoader, preprocess with spawn) receive the tokenizer pickled."""
    import pickle

    tok = Tokenizer.from_pretrained(DEMO, split_special_tokens=True)
    again = pickle.loads(pickle.dumps(tok))
    text = "a </s> 中文 😀"
    assert (again.encoder, again.split_special_tokens) == ("tiktoken", True)
    assert again.encode(text) == tok.encode(text) and again.encode_with_offsets(text) == tok.encode_with_offsets(text)


def test_rank_encoder_refuses_unmade_or_non_byte_entries():
    """Tokenizer rejects such vocabularies itself (check_merges); rank_encoder does not rely on it."""
    from tokenizers import models

    from aquila.tokenizer.fast import rank_encoder

    vocab, merges = with_merges([("a", "b")])
    for extra, reason in (("filler", "neither byte symbols nor made by a merge"), ("中", "is not a byte-level string")):
        v = {**vocab, extra: len(vocab)}
        encoder, why = rank_encoder(v, merges, models.BPE(v, merges), {})
        assert encoder is None and reason in why


def test_encode_without_tiktokens_core(tokenizers_pair, monkeypatch):
    """Where tiktoken's core object is not reachable, encode scans for lone surrogates first: the same ids."""
    fast, ref, _ = tokenizers_pair[0]
    texts = [*MIXED, "a </s> b<|endoftext|>", "x\ud800y", "\ud83d\ude00", ""]
    want = [fast.encode(t) for t in texts]
    assert want == [ref.encode(t) for t in texts]

    class Public:  # the Encoding's public methods only
        def __init__(self, encoding):
            self.encode, self.encode_ordinary = encoding.encode, encoding.encode_ordinary

    monkeypatch.setattr(fast._fast, "_encoding", Public(fast._fast._encoding))
    assert [fast.encode(t) for t in texts] == want


def test_split_special_tokens_with_lone_surrogates(tokenizers_pair):
    for fast, ref, _ in tokenizers_pair:
        fast.split_special_tokens = ref.split_special_tokens = True
        try:
            for text in ["a</s>\ud800b", "\ud83d\ude00[CLS]", "x\udfff<|endoftext|>y"]:
                assert fast.encode(text) == ref.encode(text) == fast.encode_arrays([text])[0].tolist()
        finally:
            fast.split_special_tokens = ref.split_special_tokens = False
