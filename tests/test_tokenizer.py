"""aquila.tokenizer: Aquila's special-id table, FlagAI's API, round trips, file formats and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.errors import AquilaError
from aquila.tokenizer import SPECIAL_TOKENS, Tokenizer, bytes_to_unicode, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "aquila" / "demo_tokenizer"

AQUILA_TABLE = {
    "<|endoftext|>": 0,
    "<|startofpiece|>": 100000,
    "<|endofpiece|>": 100001,
    "<|LDWANG|>": 100002,
    "[MASK]": 100003,
    "[gMASK]": 100004,
    "[sMASK]": 100005,
    "[CLS]": 100006,
    "</s>": 100007,
}
COMMANDS = {
    "pad": 0,
    "eos": 0,
    "unk": 0,
    "sop": 100000,
    "eop": 100001,
    "MASK": 100003,
    "gMASK": 100004,
    "sMASK": 100005,
    "cls": 100006,
    "sep": 100007,
}


def write_flagai_files(d: Path, base: int, merges: list[str] | None = None, special_map: bool = False) -> Path:
    """A FlagAI-layout directory: <|endoftext|> = 0, the 256 byte symbols, `merges`, then filler merges of printable
    symbols (never of the space/newline ones) up to `base` entries, each entry made by its merge as in a trained BPE."""
    d.mkdir(parents=True, exist_ok=True)
    vocab = {"<|endoftext|>": 0}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    pairs = [tuple(m.split(" ")) for m in merges or []]
    for a, b in pairs:
        vocab.setdefault(a + b, len(vocab))
    fillers = filler_merges()
    while len(vocab) < base:
        a, b = next(fillers)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            pairs.append((a, b))
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text(
        "\n".join(["#version: 0.2 - Trained by huggingface/tokenizers", *(f"{a} {b}" for a, b in pairs)]) + "\n"
    )
    if special_map:
        (d / "special_tokens_map.json").write_text(
            json.dumps({"cls_token": {"content": "[CLS]"}, "sep_token": {"content": "</s>"}})
        )
    return d


def filler_merges():
    """Merges of two printable byte symbols, then of those with a third."""
    printable = [ch for ch in bytes_to_unicode().values() if ord(ch) < 256]
    yield from ((x, y) for x in printable for y in printable)
    yield from ((x + y, z) for x in printable for y in printable for z in printable)


@pytest.fixture(scope="module")
def demo() -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def demo_split() -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO, split_special_tokens=True)


@pytest.fixture(scope="module")
def aquila_sized(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(write_flagai_files(tmp_path_factory.mktemp("aq"), 100000, ["Ġ t", "h e"]))


# --- special ids ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("special_map", [False, True])
def test_aquila_special_id_table_with_100000_base(tmp_path, special_map):
    tok = Tokenizer.from_pretrained(write_flagai_files(tmp_path, 100000, special_map=special_map))
    assert len(tok) == 100008
    assert len(tok.get_vocab()) == 100000
    for token, id_ in AQUILA_TABLE.items():
        assert tok.token_to_id(token) == id_
        assert tok.id_to_token(id_) == token
    for name, id_ in COMMANDS.items():
        assert tok.get_command_id(name) == id_
    assert (tok.token_start_id, tok.token_end_id, tok.token_unk_id, tok.token_pad_id) == (100006, 100007, 0, 0)


def test_specials_follow_any_base_size(tmp_path):
    tok = Tokenizer.from_pretrained(write_flagai_files(tmp_path, 300))
    assert len(tok) == 308
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(300, 308))
    assert tok.token_start_id == 306 and tok.token_end_id == 307


def test_unknown_command_name(aquila_sized):
    with pytest.raises(AquilaError, match="unknown command token 'bos'"):
        aquila_sized.get_command_id("bos")


def test_demo_tokenizer_in_repo(demo):
    assert len(demo) == 16008
    assert len(demo.get_vocab()) == 16000
    assert demo.token_start_id == 16006 and demo.token_end_id == 16007 and demo.token_pad_id == 0
    text = "中华人民共和国国务院总理"
    assert len(demo.encode(text)) < len(text)  # Chinese words are merged, not byte-split
    size = sum(p.stat().st_size for p in DEMO.iterdir())
    assert size < 1_500_000


# --- FlagAI API -----------------------------------------------------------------------------------------------------


def test_encode_plus_single_and_pair(aquila_sized):
    tok = aquila_sized
    a, b = tok.encode("the cat"), tok.encode("a dog")
    out = tok.encode_plus("the cat")
    assert out["input_ids"] == [100006, *a, 100007]
    assert out["token_type_ids"] == [0] * len(out["input_ids"])
    pair = tok.encode_plus("the cat", "a dog")
    assert pair["input_ids"] == [100006, *a, 100007, *b, 100007]
    assert pair["token_type_ids"] == [0] * len(pair["input_ids"])


def test_encode_plus_truncation_keeps_bos_and_eos(aquila_sized):
    tok = aquila_sized
    ids = tok.encode_plus("abcdefghij", max_length=5)["input_ids"]
    assert ids == [100006, *tok.encode("abcdefghij")[:3], 100007]
    pair = tok.encode_plus("abcdefghij", "xy", max_length=7)["input_ids"]
    assert len(pair) == 7 and pair[0] == 100006 and pair[-1] == 100007 and pair.count(100007) == 2
    assert (
        len(tok.encode_plus("abcdefghij", max_length=5, truncation=False)["input_ids"])
        == len(tok.encode("abcdefghij")) + 2
    )
    with pytest.raises(AquilaError, match="max_length=1"):
        tok.encode_plus("abc", max_length=1)


def test_encode_has_no_bos_eos(demo):
    ids = demo.encode("hello world")
    assert demo.token_start_id not in ids and demo.token_end_id not in ids


def test_decode_specials_and_unknown_ids(demo):
    ids = demo.encode_plus("Hello")["input_ids"]
    assert demo.decode(ids) == "[CLS]Hello</s>"
    assert demo.decode(ids, skip_special_tokens=True) == "Hello"
    assert demo.decode([0]) == "<|endoftext|>"
    assert demo.decode([*demo.encode("ab"), 10**6, -1, 2**40, *demo.encode("c")]) == "abc"  # unknown ids dropped
    assert demo.decode_batch([[-1, *demo.encode("ab")]]) == ["ab"]
    assert demo.decode([]) == ""


def test_decode_accepts_numpy_and_torch(demo):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = demo.encode("你好 world")
    assert demo.decode(np.array(ids)) == demo.decode(torch.tensor(ids)) == "你好 world"


def test_decode_invalid_utf8_is_replaced(demo):
    table = bytes_to_unicode()
    lead = demo.token_to_id(table[0xE4])  # first byte of a 3-byte character, alone
    assert demo.decode([*demo.encode("a"), lead, *demo.encode("b")]) == "a\ufffdb"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 16010), max_size=30))
def test_decode_matches_python_bytes_decode(demo, ids):
    """Byte semantics of decode: concatenated token bytes, decoded with errors='replace', specials as text."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    vocab = {i: t for t, i in demo.get_vocab().items()}
    specials = {demo.token_to_id(t): t for t in ("<|endoftext|>", *SPECIAL_TOKENS)}
    raw = b""
    for i in ids:
        if i in specials:
            raw += specials[i].encode()
        elif i in vocab:
            raw += bytes(inverse[c] for c in vocab[i])
    assert demo.decode(ids) == raw.decode("utf-8", errors="replace")


def test_batch_methods_match_single(demo):
    texts = ["中文 text", "def f():\n    pass\n", "", "😀\r\n"] * 5
    batch = demo.encode_batch(texts)
    assert batch == [demo.encode(t) for t in texts]
    assert demo.decode_batch(batch) == texts


# --- round trips ----------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(demo, text):
    assert demo.decode(demo.encode(text)) == text


PIECES = ["中", "文", "a", " ", "\r\n", "\n", "😀", "[CLS]", "</s>", "<|endoftext|>", "é", "[gMASK]"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12).map("".join))
def test_round_trip_both_special_modes(demo, demo_split, text):
    for tok in (demo, demo_split):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "text", ["中文和English混合，还有code: x = {'a': 1}\r\n", "👨‍👩‍👧 emoji", "\n\n\t  ", "a\x00b\x7f", "é\u0301"]
)
def test_round_trip_examples(demo, text):
    assert demo.decode(demo.encode(text)) == text
    assert demo.decode_batch(demo.encode_batch([text])) == [text]


def test_lone_surrogates_become_replacement_characters(demo):
    text = "a\ud800b\udfff"
    assert demo.decode(demo.encode(text)) == "a\ufffdb\ufffd"
    assert demo.encode_batch([text, "ok"]) == [demo.encode("a\ufffdb\ufffd"), demo.encode("ok")]
    ids, spans = demo.encode_with_offsets(text)
    assert ids == demo.encode(text) and spans[-1][1] == len(text)


def test_newlines_are_separate_tokens_only_when_untrained(aquila_sized):
    # With no merges for them, "\n\n" is two Ċ tokens, as in Aquila-7B (199, 199 there).
    nl = aquila_sized.token_to_id("Ċ")
    assert aquila_sized.encode("\n\n") == [nl, nl]


# --- special strings in text ----------------------------------------------------------------------------------------


def test_special_strings_are_literal_by_default(demo):
    ids = demo.encode("a </s> b [CLS]<|endoftext|>")
    assert not set(ids) & {0, *range(16000, 16008)}


def test_split_special_tokens_option(demo):
    tok = Tokenizer.from_pretrained(DEMO, split_special_tokens=True)
    assert tok.split_special_tokens and not demo.split_special_tokens
    ids = tok.encode("a </s> b<|endoftext|>[gMASK]")
    assert ids == [*tok.encode("a "), 16007, *tok.encode(" b"), 0, 16004]
    tok.split_special_tokens = False
    assert tok.encode("a </s> b") == demo.encode("a </s> b")


# --- offsets --------------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_offsets_cover_the_text(demo, text):
    ids, spans = demo.encode_with_offsets(text)
    assert ids == demo.encode(text)
    assert len(spans) == len(ids)
    # Spans are ordered and leave no gap; a character split over several tokens repeats (part of) its span.
    pos, last_start = 0, 0
    for start, end in spans:
        assert last_start <= start <= pos and start < end
        last_start, pos = start, max(pos, end)
    assert pos == len(text)


def test_offsets_map_conversation_spans(demo):
    """What the SFT pipeline does: tokenize once, find the tokens of a character span."""
    human, gpt = "### Human: 你好\n", "### Assistant: Hello!\n"
    text = human + gpt
    ids, spans = demo.encode_with_offsets(text)
    in_gpt = [i for i, (s, e) in zip(ids, spans) if s >= len(human)]
    assert demo.decode(in_gpt).strip() == gpt.strip()


# --- files ----------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_both_forms(demo, tmp_path):
    demo.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    text = "中文 English </s> code()\n"
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode(text) == demo.encode(text) and len(again) == 16008
    (tmp_path / "vocab.json").unlink()
    (tmp_path / "merges.txt").unlink()
    from_json = Tokenizer.from_pretrained(tmp_path)  # tokenizer.json alone
    assert from_json.encode(text) == demo.encode(text) and len(from_json) == 16008


def test_flagai_layout_with_merges(tmp_path):
    tok = Tokenizer.from_pretrained(write_flagai_files(tmp_path, 400, ["Ġ t", "h e", "Ġt he"]))
    assert tok.encode(" the") == [tok.token_to_id("Ġthe")]
    assert load_tokenizer(tmp_path).encode(" the") == tok.encode(" the")


@pytest.mark.slow
def test_transformers_loads_saved_files_with_same_ids(demo, tmp_path):
    transformers = pytest.importorskip("transformers")
    demo.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello 世界 [CLS] x </s>\n  def f(): 😀"
    split = Tokenizer.from_pretrained(tmp_path, split_special_tokens=True)
    assert hf.encode(text, add_special_tokens=False) == split.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (16006, 16007, 0, 16008)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_missing_merges_txt(tmp_path):
    write_flagai_files(tmp_path, 300)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(AquilaError, match="vocab.json but no merges.txt"):
        Tokenizer.from_pretrained(tmp_path)


def test_vocab_json_not_json(tmp_path):
    write_flagai_files(tmp_path, 300)
    (tmp_path / "vocab.json").write_text('{"a": 0,')
    with pytest.raises(AquilaError, match=r"vocab\.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_vocab_json_wrong_shape(tmp_path):
    write_flagai_files(tmp_path, 300)
    (tmp_path / "vocab.json").write_text('["a", "b"]')
    with pytest.raises(AquilaError, match=r"vocab\.json must be a JSON object"):
        Tokenizer.from_pretrained(tmp_path)


def test_merges_line_with_unknown_token(tmp_path):
    write_flagai_files(tmp_path, 258, ["h e"])
    with open(tmp_path / "merges.txt", "a") as f:
        f.write("zz q\n")
    with pytest.raises(AquilaError, match=r"merges\.txt:3: merge 'zz' 'q' uses 'zz'") as e:
        Tokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_merges_line_malformed(tmp_path):
    write_flagai_files(tmp_path, 300)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nabc\n")
    with pytest.raises(AquilaError, match=r"merges\.txt:2: expected two tokens"):
        Tokenizer.from_pretrained(tmp_path)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "README").write_text("nothing here")
    with pytest.raises(AquilaError, match="has no tokenizer files"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(AquilaError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_vocab_ids_with_gap(tmp_path):
    write_flagai_files(tmp_path, 300)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab[max(vocab, key=vocab.get)] = 5000
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(AquilaError, match="ids must be exactly 0..299"):
        Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_json_not_bpe(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(AquilaError, match=r"tokenizer\.json: expected a byte-level BPE"):
        Tokenizer.from_pretrained(tmp_path)


def demo_copy(tmp_path: Path) -> Path:
    d = tmp_path / "tok"
    shutil.copytree(DEMO, d)
    return d


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_or_empty_merges_txt(tmp_path, keep):
    d = demo_copy(tmp_path)
    lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    (d / "merges.txt").write_text("\n".join(lines[: int(len(lines) * keep)]) + "\n" if keep else "", encoding="utf-8")
    (d / "tokenizer.json").unlink()
    with pytest.raises(
        AquilaError, match=r"merges\.txt: [\d,]+ of the 16,000 vocabulary entries are made by none"
    ) as e:
        Tokenizer.from_pretrained(d)
    assert "\n" not in str(e.value) and "truncated" in str(e.value)


def test_byte_vocabulary_needs_no_merges(tmp_path):
    tok = Tokenizer.from_pretrained(write_flagai_files(tmp_path, 257))
    assert len(tok) == 265 and tok.decode(tok.encode("中 x")) == "中 x"


def test_merges_txt_and_vocab_json_with_a_byte_order_mark(demo, tmp_path):
    d = demo_copy(tmp_path)
    for name in ("merges.txt", "vocab.json", "tokenizer.json"):
        (d / name).write_bytes(b"\xef\xbb\xbf" + (d / name).read_bytes())
    text = "BOM 中文 x = 1\n"
    assert Tokenizer.from_pretrained(d).encode(text) == demo.encode(text)


def test_broken_tokenizer_json_beside_merges_txt(tmp_path):
    d = demo_copy(tmp_path)
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text(encoding="utf-8")[:1000], encoding="utf-8")
    with pytest.raises(AquilaError, match=r"tok/tokenizer\.json is not valid JSON"):
        Tokenizer.from_pretrained(d)


def edit_tokenizer_json(d: Path, edit) -> None:
    data = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def swap_merges(data: dict) -> None:
    m = data["model"]["merges"]
    m[10], m[11] = m[11], m[10]


def drop_last_merge(data: dict) -> None:
    data["model"]["merges"].pop()
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < 15999}


def renumber_cls(data: dict) -> None:
    next(t for t in data["added_tokens"] if t["content"] == "[CLS]")["id"] = 7


def swap_ids(data: dict) -> None:
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (swap_merges, r"merge 11 is .* there, .* in merges\.txt"),
        (drop_last_merge, r"vocab\.json entry .* \(id 15999\) is not in its model\.vocab"),
        (renumber_cls, r"added token '\[CLS\]' is id 7 there, but 16006 by Aquila's rule"),
        (swap_ids, r"'a' is id 66 there, 65 in vocab\.json"),
    ],
)
def test_tokenizer_json_that_disagrees_with_merges_txt(tmp_path, edit, message):
    d = demo_copy(tmp_path)
    edit_tokenizer_json(d, edit)
    with pytest.raises(
        AquilaError, match=r"tok/tokenizer\.json does not match vocab\.json \+ merges\.txt beside it: " + message
    ) as e:
        Tokenizer.from_pretrained(d)
    assert "\n" not in str(e.value)


# --- package structure ----------------------------------------------------------------------------------------------


def test_tokenizer_package_has_no_import_cycle():
    """Every import between aquila.tokenizer's modules, at module or function level, points one way."""
    import ast

    package = ROOT / "aquila" / "tokenizer"
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        if path.stem == "__init__":
            continue
        names = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        assert "aquila.tokenizer" not in names, f"{path.name} imports the package root, which imports it back"
        graph[path.stem] = {m.rsplit(".", 1)[1] for m in names if m and m.startswith("aquila.tokenizer.")}
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join((*stack, module))}"
        if module not in done:
            for dep in graph[module]:
                visit(dep, (*stack, module))
            done.add(module)

    for module in graph:
        visit(module, ())
    assert graph["bpe"] >= {"base", "files"} and "bpe" not in graph["sp"]


def test_base_tokenizer_is_the_protocol_evaluation_uses():
    from typing import Protocol, get_type_hints

    from aquila.evaluation.runner import evaluate_subset
    from aquila.tokenizer import BaseTokenizer
    from aquila.tokenizer.sp import SentencePieceTokenizer

    assert Protocol in BaseTokenizer.__mro__
    assert BaseTokenizer in Tokenizer.__mro__ and BaseTokenizer in SentencePieceTokenizer.__mro__
    assert get_type_hints(evaluate_subset)["tokenizer"] is BaseTokenizer


def test_encodable_text_is_the_shared_cleanup():
    from aquila.tokenizer import encodable_text

    assert encodable_text("a\ud800b\udfff") == "a\ufffdb\ufffd"
    with pytest.raises(AquilaError, match="tokenizer input must be str, got bytes"):
        encodable_text(b"abc")
