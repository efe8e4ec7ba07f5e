import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aquila import cli
from aquila.data.indexed_dataset import MMapIndexedDataset
from aquila.data.preprocess import PreprocessOptions, preprocess
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
    stats = preprocess(src, TOKENIZER, tmp_path / "out", PreprocessOptions(workers=1, chunk_size=2))
    assert stats.docs == len(TEXTS)
    ds = MMapIndexedDataset(tmp_path / "out_text_document")
    assert ds.dtype == np.uint16  # 16,008 ids < 65,500
    assert len(ds) == ds.num_documents == len(TEXTS)
    for i, text in enumerate(TEXTS):
        assert ds[i].tolist() == tok.encode_plus(text)["input_ids"]
    preprocess(src, TOKENIZER, tmp_path / "eod", PreprocessOptions(append_eod=True))
    eod = MMapIndexedDataset(tmp_path / "eod_text_document")
    assert eod[0].tolist() == tok.encode(TEXTS[0]) + [tok.token_end_id]


def test_one_and_two_workers_byte_identical(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(300))
    for w in (1, 2):
        preprocess(src, TOKENIZER, tmp_path / f"w{w}", PreprocessOptions(workers=w, chunk_size=7))
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
    stats = preprocess(src, TOKENIZER, tmp_path / "o2", PreprocessOptions(skip_bad_lines=True))
    assert (stats.docs, stats.bad_lines) == (19, 1)


def test_non_object_line_is_bad(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n[1, 2]\n')
    from aquila.errors import AquilaError

    with pytest.raises(AquilaError, match=r"in.jsonl:2: not a JSON object"):
        preprocess(src, TOKENIZER, tmp_path / "o")
    assert preprocess(src, TOKENIZER, tmp_path / "o", PreprocessOptions(skip_bad_lines=True)).bad_lines == 1


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


def test_worker_that_dies_is_one_error_and_nothing_written(tmp_path, monkeypatch):
    """A worker killed mid-run (OOM killer, kill -9) is an error naming what happened; it used to hang the pool."""
    import aquila.data.preprocess as pre
    from aquila.errors import AquilaError

    src = write_jsonl(tmp_path / "in.jsonl", corpus(200))
    parent = os.getpid()
    encode = pre.encode_chunk

    def dies_in_a_worker(tok, path, first_line, *rest):
        if os.getpid() != parent and first_line > 50:
            os._exit(9)
        return encode(tok, path, first_line, *rest)

    monkeypatch.setattr(pre, "encode_chunk", dies_in_a_worker)  # forked workers inherit the patched module
    with pytest.raises(AquilaError, match="a worker process died"):
        preprocess(src, TOKENIZER, tmp_path / "o", PreprocessOptions(workers=2, chunk_size=5))
    assert final_files(tmp_path) == ["in.jsonl"] and len(os.listdir(tmp_path)) == 1


@pytest.mark.slow
def test_error_with_chunks_still_queued_never_hangs(tmp_path):
    """A bad line while chunks are in flight: multiprocessing.Pool's terminate() deadlocked about once in a
    hundred such runs (CI hung here). Many runs in a row, each bounded by a timeout in a child process."""
    lines = [json.dumps({"text": t}) for t in corpus(20)]
    lines[12] = '{"text": "unterminated'
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    code = (
        "from aquila.data.preprocess import PreprocessOptions, preprocess\n"
        "from aquila.errors import AquilaError\n"
        "for i in range(150):\n"
        "    try:\n"
        f"        preprocess({str(src)!r}, {str(TOKENIZER)!r}, {str(tmp_path / 'o')!r}, "
        "PreprocessOptions(workers=2, chunk_size=3))\n"
        "    except AquilaError as e:\n"
        "        assert 'in.jsonl:13:' in str(e)\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]


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
        "from aquila.data.preprocess import PreprocessOptions, preprocess\n"
        f"preprocess({str(src)!r}, {str(TOKENIZER)!r}, {str(tmp_path / 'o')!r}, PreprocessOptions(chunk_size=10))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode != 0
    assert final_files(tmp_path) == ["in.jsonl"]


def test_kill_9_then_rerun_leaves_only_final_files(tmp_path):
    """A rerun after kill -9 removes the dead run's hidden temporaries (they were tens of MB, never removed)."""
    src = write_jsonl(tmp_path / "in.jsonl", corpus(3000))
    code = (
        "import os, signal\n"
        "import aquila.data.indexed_dataset as idx\n"
        "orig = idx.MMapIndexedDatasetBuilder.add_documents\n"
        "def add(self, *a):\n"
        "    orig(self, *a); os.kill(os.getpid(), signal.SIGKILL)\n"
        "idx.MMapIndexedDatasetBuilder.add_documents = add\n"
        "from aquila.data.preprocess import PreprocessOptions, preprocess\n"
        f"preprocess({str(src)!r}, {str(TOKENIZER)!r}, {str(tmp_path / 'o')!r}, PreprocessOptions(chunk_size=10))\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert len(os.listdir(tmp_path)) == 3  # in.jsonl and the two hidden temporaries
    preprocess(src, TOKENIZER, tmp_path / "o", PreprocessOptions(chunk_size=10))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o_text_document.bin", "o_text_document.idx"]


def test_input_directory_and_several_files_in_order(tmp_path, capsys):
    texts = corpus(30)
    d = tmp_path / "in"
    d.mkdir()
    for i, part in enumerate((texts[:10], texts[10:25], texts[25:])):
        write_jsonl(d / f"part{i}.jsonl", part)
    (d / "notes.txt").write_text("not input")
    whole = write_jsonl(tmp_path / "whole.jsonl", texts)
    preprocess(whole, TOKENIZER, tmp_path / "one")
    rc = cli.main(["preprocess", "--input", str(d), "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "dir"), "--quiet"])  # fmt: skip
    assert rc == 0
    preprocess(
        [d / "part0.jsonl", d / "part1.jsonl", d / "part2.jsonl"],
        TOKENIZER,
        tmp_path / "files",
        PreprocessOptions(workers=2),
    )
    for name in ("dir", "files"):
        for ext in ("bin", "idx"):
            assert (tmp_path / f"{name}_text_document.{ext}").read_bytes() == (
                tmp_path / f"one_text_document.{ext}"
            ).read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run(["preprocess", "--input", str(empty), "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "x")], capsys)  # fmt: skip
    assert rc == 2 and err.count("\n") == 1 and "a directory with no *.jsonl files" in err


def test_deeply_nested_json_line_is_one_error_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"text": "a"}\n' + '{"x": ' * 100000 + "1" + "}" * 100000 + "\n" + "[" * 100000 + "]" * 100000 + "\n"
    )
    argv = ["preprocess", "--input", str(src), "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "o")]
    rc, err = run(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and f"{src}:2: not a JSON object (nested too deeply)" in err
    assert preprocess(src, TOKENIZER, tmp_path / "o", PreprocessOptions(skip_bad_lines=True)).bad_lines == 2


def test_output_prefix_under_a_file_is_one_error_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    (tmp_path / "afile").write_text("x")
    argv = ["preprocess", "--input", str(src), "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "afile" / "o")]  # fmt: skip
    rc, err = run(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and "afile is a file, not a directory" in err


def test_full_disk_is_one_line_and_nothing_half_written(tmp_path, capsys, monkeypatch):
    import errno

    import aquila.data.indexed_dataset as idx

    class FullDisk:
        """A file on a disk with 5000 bytes free."""

        def __init__(self, path, mode):
            self.f, self.room = open(path, mode), 5000

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.f.write(data)

        def close(self):
            self.f.close()

    monkeypatch.setattr(idx, "open", FullDisk, raising=False)
    src = write_jsonl(tmp_path / "in.jsonl", corpus(400))
    argv = ["preprocess", "--input", str(src), "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "o"), "--chunk-size", "10"]  # fmt: skip
    rc, err = run(argv, capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"cannot write {tmp_path / 'o_text_document.bin'}: No space left on device (nothing written" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_chunks_are_bounded_in_bytes():
    from aquila.data.preprocess import iter_chunks

    lines = [b"x" * 100 + b"\n"] * 50 + [b"y" * 5000 + b"\n"] + [b"z\n"] * 3
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        f.write(b"".join(lines))
        f.flush()
        chunks = list(iter_chunks(f.name, chunk_size=256, chunk_bytes=1000))
    assert [first for first, _ in chunks][:2] == [1, 10]
    assert b"".join(c for _, c in chunks) == b"".join(lines)
    assert all(len(c) <= 1000 or c.count(b"\n") == 1 for _, c in chunks)


PEAK_RSS = (  # VmHWM after clearing it: ru_maxrss would include the parent's peak from before exec
    "import re, sys\n"
    "from aquila.data.preprocess import PreprocessOptions, preprocess\n"
    "open('/proc/self/clear_refs', 'w').write('5')\n"
    "preprocess(sys.argv[1], sys.argv[2], sys.argv[3], PreprocessOptions(workers=int(sys.argv[4])))\n"
    "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"  # KiB
)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_memory_flat_in_the_input_size(tmp_path, workers):
    """Peak RSS for 3 MB and 9 MB of 100 KB documents: streamed in chunks bounded in bytes, never held whole
    (chunks of 256 lines held all 9 MB at once, and its str and token copies)."""
    text = " ".join(TEXTS)
    doc = json.dumps({"text": text * (100_000 // len(text.encode()))}, ensure_ascii=False) + "\n"
    peaks = []
    for mb in (3, 9):
        src = tmp_path / f"in{mb}.jsonl"
        src.write_text(doc * int(mb * 1e6 / len(doc.encode())), encoding="utf-8")
        r = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(src), str(TOKENIZER), str(tmp_path / f"o{mb}"), str(workers)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        peaks.append(int(r.stdout.split()[-1]) / 1024)
    # Holding the input would add its 6 MB more bytes at least (and several times that as str and ids).
    assert peaks[1] - peaks[0] < 6, peaks


@pytest.mark.parametrize("workers", [1, 2])
def test_long_document_encoded_in_pieces_has_the_documents_ids(tmp_path, tok, monkeypatch, workers):
    import aquila.data.preprocess as pp

    monkeypatch.setattr(pp, "PIECE_CHARS", 300)  # forked workers inherit it
    doc = "\n".join(TEXTS * 40)
    assert len(list(pp.text_pieces(doc, 300))) > 10
    src = write_jsonl(tmp_path / "in.jsonl", [TEXTS[0], doc, TEXTS[1]])
    preprocess(src, TOKENIZER, tmp_path / "o", PreprocessOptions(workers=workers, chunk_size=1))
    ds = MMapIndexedDataset(tmp_path / "o_text_document")
    assert [ds[i].tolist() for i in range(3)] == [tok.encode_plus(t)["input_ids"] for t in (TEXTS[0], doc, TEXTS[1])]


def test_tokenizer_whose_ids_change_at_cuts_is_not_cut():
    from aquila.data.preprocess import cuts_keep_ids

    class PrefixPerCall:  # like sentencepiece: every encode call starts a word ('▁')
        def encode(self, text):
            return [0] + [ord(c) for c in text]

    assert cuts_keep_ids(PrefixPerCall()) is False


def random_text(nbytes, rng):
    """Words of random latin and CJK letters: many distinct pre-tokens, like real text (unlike repeats)."""
    alphabet = list("abcdefghijklmnopqrstuvwxyz") + [chr(c) for c in range(0x4E00, 0x4E00 + 200)]
    words = ["".join(rng.choice(alphabet, size=int(rng.integers(2, 9)))) for _ in range(nbytes // 6)]
    seps = rng.choice([" ", " ", " ", "\n"], size=len(words))
    return "".join(w + s for w, s in zip(words, seps)).encode()[:nbytes].decode(errors="ignore")


@pytest.mark.slow
def test_memory_flat_in_the_size_of_one_document(tmp_path):
    """Peak RSS for one document of 0.5 MB and of 2 MB. Encoded whole, the tokenizer's bookkeeping grew by
    ~120 bytes per input byte (+370 MB from 1 to 4 MB; 1.7 GB for a 15 MB document of the demo corpus)."""
    rng = np.random.default_rng(0)
    peaks = []
    for mb in (0.5, 2):
        src = tmp_path / f"one{mb}.jsonl"
        src.write_text(json.dumps({"text": random_text(int(mb * 1_000_000), rng)}, ensure_ascii=False) + "\n", "utf-8")
        r = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(src), str(TOKENIZER), str(tmp_path / f"o{mb}"), "1"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        peaks.append(int(r.stdout.split()[-1]) / 1024)
    # What must grow with the 1.5 MB more: the line's bytes (1 per byte), its str (<= 2 per byte here) and its ids,
    # at most one per byte (byte-level BPE), held as int32 pieces, int64 and the output dtype, then written (<= 16):
    # 19 bytes per input byte, bounded by 24.
    assert peaks[1] - peaks[0] < 1.5 * 24, peaks


def _chunks_line_by_line(path, chunk_size, chunk_bytes):
    """The chunking as it was, a Python step per line: the reference for iter_chunks's cuts."""
    with open(path, "rb") as f:
        lineno, lines, nbytes = 1, [], 0
        for line in f:
            if lines and (len(lines) >= chunk_size or nbytes + len(line) > chunk_bytes):
                yield lineno, b"".join(lines)
                lineno, lines, nbytes = lineno + len(lines), [], 0
            lines.append(line)
            nbytes += len(line)
        if lines:
            yield lineno, b"".join(lines)


@pytest.mark.parametrize("seed", range(40))
def test_chunks_cut_where_line_by_line_chunking_did(tmp_path, seed):
    """Same (first line, bytes) chunks as the per-line loop: long lines, blank lines, no final newline, limits of
    a few lines or bytes."""
    from aquila.data.preprocess import iter_chunks

    rng = random.Random(seed)
    lines = [b"x" * rng.choice([0, 0, 1, 5, 30, 99, 100, 101, 250, 3000]) + b"\n" for _ in range(rng.randint(0, 60))]
    data = b"".join(lines) + (b"tail" * rng.randint(0, 40) if rng.random() < 0.5 else b"")
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    chunk_size, chunk_bytes = rng.choice([1, 2, 3, 7, 256]), rng.choice([1, 50, 100, 101, 1000])
    assert list(iter_chunks(src, chunk_size, chunk_bytes)) == list(_chunks_line_by_line(src, chunk_size, chunk_bytes))


@pytest.mark.parametrize("final_newline", [True, False])
def test_chunks_of_lines_longer_than_a_read(tmp_path, final_newline):
    """Lines far over chunk_bytes plus iter_chunks's read-ahead (64 KiB): read on until their newline, or the end."""
    from aquila.data.preprocess import iter_chunks

    data = b"a\n" + b"x" * 300_000 + b"\nb\n" + b"y" * 200_000 + (b"\n" if final_newline else b"")
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    for size, limit in [(256, 1000), (1, 1), (2, 70_000)]:
        assert list(iter_chunks(src, size, limit)) == list(_chunks_line_by_line(src, size, limit))


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_changes_no_environment_or_module_state(tmp_path, monkeypatch, workers):
    """A library call leaves the caller's process as it found it (it used to set TOKENIZERS_PARALLELISM=false
    and a module-level tokenizer)."""
    import aquila.data.preprocess as pp

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    environ = dict(os.environ)
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS * 3)
    preprocess(src, TOKENIZER, tmp_path / "o", PreprocessOptions(workers=workers, chunk_size=2))
    assert dict(os.environ) == environ
    assert pp._WORKER_TOKENIZER is None


def test_preprocess_options_reject_a_string_of_keys():
    from aquila.errors import AquilaError

    with pytest.raises(AquilaError, match="json_keys: expected a sequence of keys, got the string 'text'"):
        PreprocessOptions(json_keys="text")
