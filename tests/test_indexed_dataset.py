import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from aquila.data.indexed_dataset import (
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
    merge_datasets,
)
from aquila.errors import AquilaError


def reference_idx(sizes, doc_idx, code, itemsize):
    """An independent minimal writer following the documented layout, struct.pack per field."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    ptr = 0
    for s in sizes:
        out += struct.pack("<q", ptr)
        ptr += s * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


def random_docs(rng, n, vocab=60000):
    return [rng.integers(0, vocab, size=int(rng.integers(0, 50))) for _ in range(n)]


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_idx_bytes_match_reference_writer(tmp_path, dtype, code):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 30)
    prefix = tmp_path / "d"
    with MMapIndexedDatasetBuilder(prefix, dtype) as b:
        for i, d in enumerate(docs):
            if i % 5 == 4:  # a multi-sequence document
                b.add_item(d[:3])
                b.add_item(d[3:])
                b.end_document()
            else:
                b.add_document(d)
    sizes, doc_idx = [], [0]
    for i, d in enumerate(docs):
        sizes += [3 if len(d) >= 3 else len(d), max(len(d) - 3, 0)] if i % 5 == 4 else [len(d)]
        doc_idx.append(len(sizes))
    itemsize = np.dtype(dtype).itemsize
    assert (tmp_path / "d.idx").read_bytes() == reference_idx(sizes, doc_idx, code, itemsize)
    flat = np.concatenate(docs).astype(dtype)
    assert (tmp_path / "d.bin").read_bytes() == flat.tobytes()
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(sizes) and ds.num_documents == len(docs)
    assert ds.doc_idx.tolist() == doc_idx


def test_random_access_equals_sequential(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 200)
    with MMapIndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
        for d in docs:
            b.add_document(d)
    ds = MMapIndexedDataset(tmp_path / "d")
    sequential = [np.array(x) for x in ds]
    for i in rng.permutation(len(docs)):
        assert np.array_equal(ds[int(i)], docs[i]) and np.array_equal(ds[int(i)], sequential[i])
        size = len(docs[i])
        off = int(rng.integers(0, size + 1))
        length = int(rng.integers(0, size - off + 1))
        assert np.array_equal(ds.get(int(i), off, length), docs[i][off : off + length])
    assert np.array_equal(ds.tokens(), np.concatenate(docs))
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert np.array_equal(ds[-1], docs[-1])
    with pytest.raises(IndexError):
        ds.get(len(docs))


def test_add_documents_batch_equals_one_by_one(tmp_path):
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 40)
    with MMapIndexedDatasetBuilder(tmp_path / "a", np.uint16) as b:
        for d in docs:
            b.add_document(d)
    with MMapIndexedDatasetBuilder(tmp_path / "b", np.uint16) as b:
        b.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()


def test_index_streamed_in_small_pieces_has_the_documented_bytes(tmp_path, monkeypatch):
    """Sizes, pointers and document starts cross many of the builder's chunks (7 entries here), also through a
    merge (add_index) and items of multi-sequence documents."""
    import aquila.data.indexed_dataset as ids

    monkeypatch.setattr(ids, "_INDEX_CHUNK", 7)
    rng = np.random.default_rng(5)
    docs = random_docs(rng, 30)
    with MMapIndexedDatasetBuilder(tmp_path / "a", np.uint16) as b:
        b.add_documents(np.concatenate(docs[:20]), np.array([len(d) for d in docs[:20]]))
        for d in docs[20:]:
            b.add_item(d[: len(d) // 2])
            b.add_item(d[len(d) // 2 :])
            b.end_document()
    with MMapIndexedDatasetBuilder(tmp_path / "m", np.uint16) as b:
        b.add_index(tmp_path / "a")
        b.add_index(tmp_path / "a")
    sizes = [len(d) for d in docs[:20]] + [n for d in docs[20:] for n in (len(d) // 2, len(d) - len(d) // 2)]
    doc_idx = list(range(21)) + list(range(22, 41, 2))
    assert (tmp_path / "a.idx").read_bytes() == reference_idx(sizes, doc_idx, 8, 2)
    merged = [0] + doc_idx[1:] + [d + len(sizes) for d in doc_idx[1:]]
    assert (tmp_path / "m.idx").read_bytes() == reference_idx(sizes * 2, merged, 8, 2)


def test_builder_memory_is_flat_in_the_number_of_documents(tmp_path):
    """3 M one-token documents: the index goes to temporary files, not memory (in memory it took ~60 bytes a
    document at finalize, 180 MB here); the .idx still has the documented layout."""
    import tracemalloc

    n, step = 3_000_000, 100_000
    tracemalloc.start()
    with MMapIndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
        for _ in range(0, n, step):
            b.add_documents(np.full(step, 7, np.uint16), np.ones(step, np.int64))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, peak  # 9.5 MB measured; in memory: 182 MB
    idx = (tmp_path / "d.idx").read_bytes()
    header = 9 + 8 + 1 + 8 + 8
    assert struct.unpack("<QQ", idx[18:34]) == (n, n + 1)
    assert np.array_equal(np.frombuffer(idx, "<i4", n, header), np.ones(n, np.int32))
    assert np.array_equal(np.frombuffer(idx, "<i8", n, header + 4 * n), np.arange(n) * 2)
    assert np.array_equal(np.frombuffer(idx, "<i8", n + 1, header + 12 * n), np.arange(n + 1))
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]  # the index temporaries are gone


def test_best_dtype():
    assert best_dtype(16008) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(100008) == np.int32


def test_token_that_does_not_fit_dtype_is_an_error(tmp_path):
    with pytest.raises(AquilaError, match="does not fit"):
        with MMapIndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
            b.add_document(np.array([70000]))
    assert os.listdir(tmp_path) == []


def test_interrupted_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with MMapIndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_merge(tmp_path):
    rng = np.random.default_rng(3)
    parts = [random_docs(rng, n) for n in (5, 0, 7)]
    prefixes = []
    for i, docs in enumerate(parts):
        prefixes.append(tmp_path / f"p{i}")
        with MMapIndexedDatasetBuilder(prefixes[-1], np.uint16) as b:
            for d in docs:
                b.add_document(d)
    merged = merge_datasets(prefixes, tmp_path / "m")
    all_docs = [d for docs in parts for d in docs]
    assert len(merged) == merged.num_documents == len(all_docs)
    for i, d in enumerate(all_docs):
        assert np.array_equal(merged[i], d)
    assert merged.doc_idx.tolist() == list(range(len(all_docs) + 1))
    with MMapIndexedDatasetBuilder(tmp_path / "wide", np.int32) as b:
        b.add_document([1])
    with pytest.raises(AquilaError, match="different dtypes"):
        merge_datasets([prefixes[0], tmp_path / "wide"], tmp_path / "m2")
    assert not (tmp_path / "m2.idx").exists() and not (tmp_path / "m2.bin").exists()


def _small(tmp_path):
    with MMapIndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
        b.add_document([1, 2, 3])
        b.add_document([4, 5])
    return tmp_path / "d"


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda p: _patch(p.with_suffix(".idx"), 0, b"TNTIDX\x00\x00\x00"), "bad magic"),
        (lambda p: _patch(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)), "version 2"),
        (lambda p: _patch(p.with_suffix(".idx"), 17, b"\x09"), "dtype code 9"),
        (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]), "truncated"),
        (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-1]), "bytes, expected"),
        (lambda p: p.with_suffix(".bin").unlink(), "not found"),
    ],
)
def test_corrupt_files_raise_one_line_naming_file(tmp_path, corrupt, match):
    prefix = _small(tmp_path)
    corrupt(prefix)
    with pytest.raises(AquilaError, match=match) as e:
        MMapIndexedDataset(prefix)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "d") in msg


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "aquila", *map(str, args)], capture_output=True, text=True)


def test_check_and_merge_cli(tmp_path):
    prefix = _small(tmp_path)
    r = run_cli("check-dataset", prefix)
    assert r.returncode == 0, r.stderr
    assert "sequences: 2" in r.stdout and "documents: 2" in r.stdout and "tokens: 5" in r.stdout
    (tmp_path / "sub").mkdir()
    r = run_cli("merge-datasets", "--input", tmp_path, "--output-prefix", tmp_path / "sub" / "all")
    assert r.returncode == 0, r.stderr
    assert MMapIndexedDataset(tmp_path / "sub" / "all").num_tokens == 5
    prefix.with_suffix(".bin").write_bytes(b"\x00")
    r = run_cli("check-dataset", prefix)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_shipped_demo_data_is_demo_tokenizer_ids():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ds = MMapIndexedDataset(os.path.join(root, "examples", "indexed_dataset", "data", "demo_text_document"))
    assert ds.dtype == np.uint16 and 5 < len(ds) and ds.num_tokens * 2 < 4_000_000  # the demo slice: ~3k tokens
    tokens = ds.tokens()
    starts = ds.pointers // 2
    ends = starts + ds.sizes - 1
    assert (tokens[starts] == 16006).all() and (tokens[ends] == 16007).all()  # [CLS] ... </s> of the demo tokenizer
    assert int(tokens.max()) <= 16007


def test_checksum_sidecar_detects_an_in_range_bit_flip(tmp_path, monkeypatch):
    """The .bin has no checksum of its own: --checksum writes per-chunk CRC-32s that check-dataset verifies."""
    import aquila.data.indexed_dataset as idx
    from aquila.data.check import check

    monkeypatch.setattr(idx, "CHECKSUM_CHUNK", 1000)  # several chunks from a small dataset
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 80, vocab=1000)
    prefix = tmp_path / "d"
    with MMapIndexedDatasetBuilder(prefix, np.uint16, checksum=True) as b:
        for d in docs:
            b.add_document(d)
    assert check(str(prefix))["checksum"] == "verified"
    data = bytearray((tmp_path / "d.bin").read_bytes())
    assert len(data) > 3000
    data[2500] ^= 0x01  # token id stays < 1000 (even low byte flipped): invisible to --vocab-size
    (tmp_path / "d.bin").write_bytes(bytes(data))
    r = run_cli("check-dataset", prefix, "--vocab-size", "1024")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "d.bin: bytes 2000..3000 differ from d.crc32.json" in r.stderr
    # merge-datasets --checksum writes one for its output; rewriting without --checksum drops a stale sidecar
    r = run_cli("merge-datasets", "--prefixes", prefix, prefix, "--output-prefix", tmp_path / "m", "--checksum")
    assert r.returncode == 0 and (tmp_path / "m.crc32.json").is_file()
    assert "checksum: verified" in run_cli("check-dataset", tmp_path / "m").stdout
    r = run_cli("merge-datasets", "--prefixes", prefix, "--output-prefix", tmp_path / "m")
    assert r.returncode == 0 and not (tmp_path / "m.crc32.json").exists()
    assert "checksum: none" in run_cli("check-dataset", tmp_path / "m").stdout
