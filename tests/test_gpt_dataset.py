import os

import numpy as np
import pytest
import torch

from aquila.data.gpt_dataset import (
    blend_indices,
    build_pretrain_datasets,
    build_sample_idx,
    parse_splits,
    split_boundaries,
)
from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder
from aquila.errors import AquilaError


def make_data(path, docs, dtype=np.uint16):
    with MMapIndexedDatasetBuilder(path, dtype) as b:
        for d in docs:
            b.add_document(d)
    return str(path)


def numbered_docs(n, rng, base=0, max_len=40):
    """Documents whose tokens are globally unique (consecutive ids), so streams can be reconstructed."""
    docs, nxt = [], base
    for _ in range(n):
        size = int(rng.integers(1, max_len))
        docs.append(np.arange(nxt, nxt + size))
        nxt += size
    return docs


def loop_sample_idx(sizes, doc_idx, seq_length, num_samples):
    """Reference: walk the document stream token by token (Megatron's helper, written as a plain loop)."""
    out = [(0, 0)]
    pos, off = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining:
            avail = sizes[doc_idx[pos]] - off
            if remaining <= avail:
                off += remaining - 1
                remaining = 0
            else:
                remaining -= avail
                pos, off = pos + 1, 0
        out.append((pos, off))
    return np.array(out)


def test_sample_idx_matches_reference_loop():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, size=50)
    doc_idx = rng.permutation(np.tile(np.arange(50), 3)).astype(np.int32)
    for seq_length in (1, 7, 64):
        n = (int(sizes.sum()) * 3 - 1) // seq_length
        fast = build_sample_idx(sizes, doc_idx, seq_length, n)
        assert np.array_equal(fast, loop_sample_idx(sizes, doc_idx, seq_length, n))


def test_one_epoch_samples_reconstruct_the_shuffled_stream(tmp_path):
    rng = np.random.default_rng(1)
    docs = numbered_docs(60, rng)
    prefix = make_data(tmp_path / "d", docs)
    seq_length = 16
    total = sum(len(d) for d in docs)
    n = (total - 1) // seq_length
    train, valid, test = build_pretrain_datasets(prefix, "100", (n, 0, 0), seq_length, seed=7)
    assert valid is None and test is None
    assert len(train) == n
    stream = np.concatenate([docs[i] for i in train.doc_idx])
    assert sorted(train.doc_idx.tolist()) == list(range(60))  # one epoch, each document once
    samples = [train.tokens(i) for i in range(n)]
    assert all(len(s) == seq_length + 1 for s in samples)
    rebuilt = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])
    assert np.array_equal(rebuilt, stream[: n * seq_length + 1])
    assert total - len(rebuilt) < seq_length  # only the tail shorter than a sample is left out
    # Served in shuffled order: every sample exactly once, each item int64 of seq_length + 1.
    served = [train[i]["input_ids"] for i in range(n)]
    assert all(s.dtype == np.int64 and s.shape == (seq_length + 1,) for s in served)
    order = sorted(range(n), key=lambda i: int(served[i][0]))
    assert [int(served[i][0]) for i in order] == sorted(int(s[0]) for s in samples)
    assert sorted(train.shuffle_idx.tolist()) == list(range(n))
    assert train.shuffle_idx.tolist() != list(range(n))


def test_multi_epoch_and_cache_files(tmp_path):
    rng = np.random.default_rng(2)
    docs = numbered_docs(30, rng)
    prefix = make_data(tmp_path / "d", docs)
    train, valid, _ = build_pretrain_datasets(prefix, "90,10", (500, 20, 0), 8, seed=2023)
    assert len(train) >= 500 and len(valid) >= 20
    counts = np.bincount(train.doc_idx, minlength=30)
    assert counts[:27].min() == counts.max() and counts[27:].sum() == 0  # whole epochs of the train split
    assert set(valid.doc_idx.tolist()) == {27, 28, 29}
    names = sorted(p for p in os.listdir(tmp_path) if p.startswith("d_"))
    assert names == sorted(
        f"d_{split}_indexmap_{n}ns_8sl_2023s_{k}"
        for split, n in (("train", 500), ("valid", 20))
        for k in ("doc_idx.npy", "sample_idx.npy", "shuffle_idx.npy", "key.txt")
    )
    # Second build loads the cache (memory-mapped) and serves the same samples.
    again, _, _ = build_pretrain_datasets(prefix, "90,10", (500, 20, 0), 8, seed=2023)
    assert isinstance(again.sample_idx, np.memmap)
    for i in (0, 1, 77, 499, 600):
        assert np.array_equal(again[i]["input_ids"], train[i]["input_ids"])
    other, _, _ = build_pretrain_datasets(prefix, "90,10", (500, 20, 0), 8, seed=1)
    assert not np.array_equal(other.shuffle_idx, train.shuffle_idx)


def test_stale_cache_is_rebuilt(tmp_path):
    rng = np.random.default_rng(3)
    prefix = make_data(tmp_path / "d", numbered_docs(20, rng))
    first, _, _ = build_pretrain_datasets(prefix, "1", (10, 0, 0), 4, seed=0)
    new_docs = numbered_docs(25, rng, base=5000)
    make_data(tmp_path / "d", new_docs)
    future = os.path.getmtime(prefix + ".idx") + 10
    os.utime(prefix + ".idx", (future, future))
    second, _, _ = build_pretrain_datasets(prefix, "1", (10, 0, 0), 4, seed=0)
    assert int(second[0]["input_ids"][0]) >= 5000
    assert max(second.doc_idx) == 24


def test_cache_keyed_on_content_not_mtime(tmp_path):
    """Data replaced by a copy with an OLDER mtime (cp -p, rsync -a) must not reuse the old cache."""
    rng = np.random.default_rng(4)
    prefix = make_data(tmp_path / "d", numbered_docs(20, rng))
    first, _, _ = build_pretrain_datasets(prefix, "1", (10, 0, 0), 4, seed=0)
    assert max(first.doc_idx) == 19
    make_data(tmp_path / "d", numbered_docs(25, rng, base=5000))
    for ext in ("bin", "idx"):
        os.utime(f"{prefix}.{ext}", (1_000_000, 1_000_000))  # 1970: older than the cache
    second, _, _ = build_pretrain_datasets(prefix, "1", (10, 0, 0), 4, seed=0)
    assert max(second.doc_idx) == 24 and int(second[0]["input_ids"][0]) >= 5000


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop_key"])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    rng = np.random.default_rng(5)
    prefix = make_data(tmp_path / "d", numbered_docs(30, rng))
    first, _, _ = build_pretrain_datasets(prefix, "1", (40, 0, 0), 4, seed=0)
    expected = [first[i]["input_ids"].tolist() for i in range(len(first))]
    sample = tmp_path / "d_train_indexmap_40ns_4sl_0s_sample_idx.npy"
    if damage == "truncate":
        sample.write_bytes(sample.read_bytes()[:-16])
    elif damage == "garbage":
        sample.write_bytes(b"not an npy file at all")
    else:
        (tmp_path / "d_train_indexmap_40ns_4sl_0s_key.txt").unlink()
    again, _, _ = build_pretrain_datasets(prefix, "1", (40, 0, 0), 4, seed=0)
    assert [again[i]["input_ids"].tolist() for i in range(len(again))] == expected
    third, _, _ = build_pretrain_datasets(prefix, "1", (40, 0, 0), 4, seed=0)  # the rebuilt cache is whole again
    assert isinstance(third.sample_idx, np.memmap)


def test_token_id_beyond_vocab_is_one_error_when_the_data_opens(tmp_path):
    prefix = make_data(tmp_path / "d", [np.array([1, 2, 3]), np.array([4, 999, 5])])
    with pytest.raises(AquilaError, match=r"d\.bin: token ids span \[1, 999\], outside the vocabulary of 100$"):
        build_pretrain_datasets(prefix, "1", (2, 0, 0), 2, seed=0, vocab_size=100)
    train, _, _ = build_pretrain_datasets(prefix, "1", (2, 0, 0), 2, seed=0, vocab_size=1000)
    assert train is not None


def test_blending_respects_weights(tmp_path):
    rng = np.random.default_rng(4)
    a = make_data(tmp_path / "a", [rng.integers(0, 100, 50) for _ in range(40)])
    b = make_data(tmp_path / "b", [rng.integers(1000, 1100, 50) for _ in range(40)])
    train, valid, test = build_pretrain_datasets(["0.3", a, 0.7, b], "100", (1000, 0, 0), 16, seed=5)
    assert valid is None and test is None and len(train) == 1000
    from_b = np.array([int(train[i]["input_ids"][0]) >= 1000 for i in range(1000)])
    counts = np.cumsum(from_b)
    m = np.arange(1, 1001)
    assert np.all(np.abs(counts - 0.7 * m) <= 1.0)
    ds_idx, sample_idx = blend_indices([1, 2, 1], 4000)
    for d, share in enumerate((0.25, 0.5, 0.25)):
        assert abs((ds_idx == d).sum() - share * 4000) <= 1
        assert np.array_equal(sample_idx[ds_idx == d], np.arange((ds_idx == d).sum()))


def test_splits():
    assert parse_splits("90,10") == pytest.approx([0.9, 0.1, 0.0])
    assert parse_splits("949/50/1") == pytest.approx([0.949, 0.05, 0.001])
    assert split_boundaries("90,10", 30) == [0, 27, 30, 30]
    assert split_boundaries("1,1,1", 10)[-1] == 10
    for bad in ("abc", "90,,10", "0,0", "-1,2", "1,2,3,4", ""):
        with pytest.raises(AquilaError, match="split string"):
            parse_splits(bad)


def test_bad_inputs(tmp_path):
    with pytest.raises(AquilaError, match="not found") as e:
        build_pretrain_datasets(str(tmp_path / "missing"), "100", (1, 0, 0), 4, 0)
    assert str(tmp_path / "missing") in str(e.value)
    prefix = make_data(tmp_path / "d", [np.arange(10)])
    with pytest.raises(AquilaError, match="split string"):
        build_pretrain_datasets(prefix, "x", (1, 0, 0), 4, 0)
    with pytest.raises(AquilaError, match="data_prefix"):
        build_pretrain_datasets([prefix, 0.5], "100", (1, 0, 0), 4, 0)


def _dist_worker(rank, world, init_file, prefix, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    train, _, _ = build_pretrain_datasets(prefix, "100", (64, 0, 0), 8, seed=11)
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.stack([train[i]["input_ids"] for i in range(64)]))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_same_samples_with_two_ranks(tmp_path):
    rng = np.random.default_rng(6)
    docs = numbered_docs(40, rng)
    single = make_data(tmp_path / "single", docs)
    (tmp_path / "dist").mkdir()
    shared = make_data(tmp_path / "dist" / "d", docs)
    ref, _, _ = build_pretrain_datasets(single, "100", (64, 0, 0), 8, seed=11)
    expected = np.stack([ref[i]["input_ids"] for i in range(64)])
    torch.multiprocessing.spawn(
        _dist_worker, args=(2, str(tmp_path / "init"), shared, str(tmp_path)), nprocs=2, join=True
    )
    for rank in (0, 1):
        assert np.array_equal(np.load(tmp_path / f"rank{rank}.npy"), expected)
