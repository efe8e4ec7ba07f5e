import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aquila import cli
from aquila.data.indexed_dataset import MMapIndexedDataset
from aquila.data.preprocess import preprocess
from aquila.tokenizer import Tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "aquila" / "demo_tokenizer"

TEXTS = [
    "人民日报社论：新年献词，祝全国各族人民新年快乐。",
    "The BBC reported that shares rose 3% on Monday.",
    "def add(a, b):\n    return a + b\n",
    "混合 mixed 文本 with emoji 🎉 and numbers 12345.",
    "A short one.",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(TOKENIZER)


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": 1}, ensure_ascii=False) + "\n")
    return path


def corpus(n):
    rng = np.random.default_rng(0)
    return [" ".join(TEXTS[i] for i in rng.integers(0, len(TEXTS), size=int(rng.integers(1, 6)))) for _ in range(n)]


def final_files(d):
    return sorted(p.name for p in Path(d).iterdir() if not p.name.startswith("."))


def test_documents_are_wrapped_like_encode_plus(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    stats = preprocess(src, TOKENIZER, tmp_path / "out", workers=1, chunk_size=2)
    assert stats.docs == len(TEXTS)
    ds = MMapIndexedDataset(tmp_path / "out_text_document")
    assert ds.dtype == np.uint16  # 16,008 ids < 65,500
    assert len(ds) == ds.num_documents == len(TEXTS)
    for i, text in enumerate(TEXTS):
        assert ds[i].tolist() == tok.encode_plus(text)["input_ids"]
    preprocess(src, TOKENIZER, tmp_path / "eod", append_eod=True)
    eod = MMapIndexedDataset(tmp_path / "eod_text_document")
    assert eod[0].tolist() == tok.encode(TEXTS[0]) + [tok.token_end_id]


def test_one_and_two_workers_byte_identical(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(300))
    for w in (1, 2):
        preprocess(src, TOKENIZER, tmp_path / f"w{w}", workers=w, chunk_size=7)
    for ext in ("bin", "idx"):
        a = (tmp_path / f"w1_text_document.{ext}").read_bytes()
        assert a == (tmp_path / f"w2_text_document.{ext}").read_bytes()
    assert MMapIndexedDataset(tmp_path / "w2_text_document").num_documents == 300


def test_several_keys_and_flagai_tokenizer_flags(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"q": a, "a": b}) for a, b in zip(TEXTS, TEXTS[1:])) + "\n")
    rc = cli.main(
        [
            "preprocess", "--input", str(src), "--json-keys", "q", "a", "--model-dir", str(TOKENIZER.parent),
            "--model-name", TOKENIZER.name, "--output-prefix", str(tmp_path / "o"), "--workers", "2", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "4 documents" in capsys.readouterr().out
    assert final_files(tmp_path) == [
        "in.jsonl",
        "o_a_document.bin",
        "o_a_document.idx",
        "o_q_document.bin",
        "o_q_document.idx",
    ]


def test_blank_lines_ignored_and_empty_texts_skipped(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n\n   \n{"text": ""}\n{"text": "b"}\n')
    stats = preprocess(src, TOKENIZER, tmp_path / "o")
    assert (stats.docs, stats.blank_lines, stats.empty_docs) == (2, 2, 1)


def run(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_json_line_names_file_and_line(tmp_path, capsys, workers):
    lines = [json.dumps({"text": t}) for t in corpus(20)]
    lines[12] = '{"text": "unterminated'
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    argv = ["preprocess", "--input", str(src), "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "o")]
    rc, err = run(argv + ["--workers", str(workers), "--chunk-size", "3"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"{src}:13:" in err and "--skip-bad-lines" in err
    assert final_files(tmp_path) == ["in.jsonl"] and len(os.listdir(tmp_path)) == 1  # no temporaries either
    rc, err = run(argv + ["--skip-bad-lines", "--quiet"], capsys)
    assert rc == 0
    stats = preprocess(src, TOKENIZER, tmp_path / "o2", skip_bad_lines=True)
    assert (stats.docs, stats.bad_lines) == (19, 1)


def test_non_object_line_is_bad(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n[1, 2]\n')
    from aquila.errors import AquilaError

    with pytest.raises(AquilaError, match=r"in.jsonl:2: not a JSON object"):
        preprocess(src, TOKENIZER, tmp_path / "o")
    assert preprocess(src, TOKENIZER, tmp_path / "o", skip_bad_lines=True).bad_lines == 1


def test_missing_key_and_non_string(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"txt": "b"}\n')
    argv = ["preprocess", "--input", str(src), "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "o")]
    rc, err = run(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and f"{src}:2: missing json key 'text'" in err
    src.write_text('{"text": 5}\n')
    rc, err = run(argv, capsys)
    assert rc == 2 and "json key 'text' is int" in err
    assert final_files(tmp_path) == ["in.jsonl"]


def test_empty_input_and_missing_file(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    argv = ["preprocess", "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "o"), "--input"]
    rc, err = run(argv + [str(src)], capsys)
    assert rc == 2 and "no documents" in err and err.count("\n") == 1
    rc, err = run(argv + [str(tmp_path / "nope.jsonl")], capsys)
    assert rc == 2 and "nope.jsonl: input file not found" in err
    assert final_files(tmp_path) == ["in.jsonl"]


def test_interrupted_run_leaves_no_final_files(tmp_path):
    """Kill the process mid-run: nothing with a final name may exist."""
    src = write_jsonl(tmp_path / "in.jsonl", corpus(3000))
    code = (
        "import os, signal, sys\n"
        "import aquila.data.indexed_dataset as idx\n"
        "orig = idx.MMapIndexedDatasetBuilder.add_documents\n"
        "n = [0]\n"
        "def add(self, *a):\n"
        "    orig(self, *a); n[0] += 1\n"
        "    if n[0] == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "idx.MMapIndexedDatasetBuilder.add_documents = add\n"
        "from aquila.data.preprocess import preprocess\n"
        f"preprocess({str(src)!r}, {str(TOKENIZER)!r}, {str(tmp_path / 'o')!r}, chunk_size=10)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode != 0
    assert final_files(tmp_path) == ["in.jsonl"]
