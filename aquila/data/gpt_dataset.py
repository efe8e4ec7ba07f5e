"""Pretraining samples from indexed datasets, with Megatron-LM GPT dataset semantics.

Each split (train/valid/test, chosen by sequence index from a weights string such as "90,10") is a
stream of shuffled documents; a sample is `seq_length + 1` consecutive tokens of that stream, crossing
document boundaries (attention is not reset), and consecutive samples overlap by one token. Three index
arrays describe it and are cached next to the data as `.npy`:

- doc_idx:     document order, `num_epochs` shuffled copies of the split's documents
- sample_idx:  (position in doc_idx, token offset) where each sample starts, num_samples + 1 rows
- shuffle_idx: the order in which samples are served

They are built once from the seed (by rank 0 when torch.distributed is initialized, the other ranks
waiting at a barrier), so the samples do not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from aquila.data.indexed_dataset import MMapIndexedDataset, missing_dataset_file
from aquila.errors import AquilaError
from aquila.io_utils import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


# -- splits ---------------------------------------------------------------------------------------
def parse_splits(splits_string: str) -> list[float]:
    """ "90,10" or "949/50/1" -> three normalised weights (missing ones are 0)."""
    text = str(splits_string).strip()
    parts = [p.strip() for p in (text.split(",") if "," in text else text.split("/"))]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise AquilaError(f"split string {splits_string!r}: expected up to 3 numbers separated by ',' or '/'") from None
    if len(weights) > 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise AquilaError(
            f"split string {splits_string!r}: expected up to 3 non-negative numbers with a positive sum (e.g. '90,10')"
        )
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_boundaries(splits_string: str, size: int) -> list[int]:
    """Sequence-index boundaries [0, a, b, size] of the three splits (Megatron's rounding)."""
    weights = parse_splits(splits_string)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(size))))
    diff = bounds[-1] - size
    bounds = [bounds[0]] + [min(max(b - diff, 0), size) for b in bounds[1:]]
    return bounds


# -- index builders (vectorised) ------------------------------------------------------------------
def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest e with (e * tokens_per_epoch - 1) // seq_length >= num_samples (at least 1)."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool
) -> np.ndarray:
    """`num_epochs` copies of `documents`, shuffled (the last epoch shuffled on its own if `separate_last`)."""
    if separate_last and num_epochs > 1:
        first = build_doc_idx(documents, num_epochs - 1, rng, False)
        last = build_doc_idx(documents, 1, rng, False)
        return np.concatenate([first, last])
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """Row i = (position in doc_idx, offset) of the first token of sample i; num_samples + 1 rows.

    Sample i covers stream tokens [i*seq_length, (i+1)*seq_length] inclusive. Empty documents are skipped.
    """
    lengths = np.asarray(sizes, dtype=np.int64)[doc_idx]
    ends = np.cumsum(lengths)  # exclusive end of each stream document
    starts_tok = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and starts_tok[-1] >= ends[-1]:
        raise AquilaError(f"internal: {num_samples} samples of {seq_length} tokens exceed the {ends[-1]}-token stream")
    pos = np.searchsorted(ends, starts_tok, side="right")
    offsets = starts_tok - (ends[pos] - lengths[pos])
    dtype = np.int32 if max(len(doc_idx), int(lengths.max(initial=0))) < 2**31 - 1 else np.int64
    return np.stack([pos, offsets], axis=1).astype(dtype)


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of [0, num_samples) followed by a separately shuffled [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_index_mappings(
    sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) for a split, exactly as Megatron's build_index_mappings."""
    tokens_per_epoch = int(np.asarray(sizes, dtype=np.int64)[documents].sum())
    if tokens_per_epoch < 2:
        raise AquilaError(f"a split with {len(documents)} documents holds {tokens_per_epoch} tokens; need at least 2")
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    separate_last = False
    samples_before_last = 0
    if num_epochs > 1:
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        last_epoch_samples = num_samples - samples_before_last
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last = last_epoch_samples < int(0.80 * samples_per_epoch)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate_last)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total_samples)
    shuffle_idx = build_shuffle_idx(samples_before_last if separate_last else total_samples, total_samples, rng)
    return doc_idx, sample_idx, shuffle_idx


# -- caching --------------------------------------------------------------------------------------
def index_cache_paths(prefix: str, name: str, num_samples: int, seq_length: int, seed: int) -> dict[str, Path]:
    base = f"{prefix}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s"
    paths = {k: Path(f"{base}_{k}_idx.npy") for k in ("doc", "sample", "shuffle")}
    paths["key"] = Path(f"{base}_key.txt")
    return paths


def cache_key(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int) -> str:
    """What the index arrays are a function of: the split's sequence sizes (content, not mtime: `cp -p` and
    `rsync -a` keep an older mtime on new data) and the parameters. Token ids do not enter the arrays."""
    h = hashlib.blake2b(digest_size=16)
    docs = np.asarray(documents, dtype=np.int64)
    h.update(np.asarray([CACHE_VERSION, len(sizes), len(docs), num_samples, seq_length, seed], dtype="<i8").tobytes())
    if len(docs) and docs[-1] - docs[0] + 1 == len(docs) and (np.diff(docs) == 1).all():
        h.update(np.ascontiguousarray(np.asarray(sizes)[docs[0] : docs[-1] + 1], dtype="<i4").tobytes())
    else:
        h.update(docs.astype("<i8").tobytes())
        h.update(np.asarray(sizes)[docs].astype("<i4").tobytes())
    return h.hexdigest()


CACHE_VERSION = 1


def _dist_rank() -> int | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return None


def _load_cache(paths: dict[str, Path], key: str, num_samples: int) -> tuple[np.ndarray, ...] | None:
    """The cached arrays if their key matches and they are whole and consistent, else None (rebuild)."""
    try:
        if paths["key"].read_text(encoding="ascii").strip() != key:
            return None
        doc, sample, shuffle = (
            np.load(paths[k], mmap_mode="r", allow_pickle=False) for k in ("doc", "sample", "shuffle")
        )
    except (OSError, ValueError, UnicodeDecodeError):  # missing, truncated or not .npy
        return None
    total = sample.shape[0] - 1 if sample.ndim == 2 else -1
    if (
        doc.ndim != 1
        or sample.ndim != 2
        or sample.shape[1] != 2
        or total < num_samples
        or shuffle.shape != (total,)
        or (total >= 0 and not 0 <= int(sample[-1, 0]) < len(doc))
    ):
        return None
    return doc, sample, shuffle


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def load_or_build_index_mappings(
    prefix: str, name: str, sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cached (doc, sample, shuffle) index arrays, building and saving them on rank 0 if missing or stale."""
    paths = index_cache_paths(prefix, name, num_samples, seq_length, seed)
    key = cache_key(sizes, documents, num_samples, seq_length, seed)
    rank = _dist_rank()
    arrays = None
    if rank in (None, 0) and _load_cache(paths, key, num_samples) is None:
        arrays = build_index_mappings(sizes, documents, num_samples, seq_length, seed)
        try:
            paths["key"].unlink(missing_ok=True)  # the key goes last: arrays without it are never trusted
            for k, arr in zip(("doc", "sample", "shuffle"), arrays):
                _save_npy(paths[k], arr)
            write_text_atomic(paths["key"], key + "\n")
            log.info("built %s index mappings: %s", name, paths["doc"].parent)
        except (OSError, AquilaError) as e:  # read-only or full data directory: keep the arrays in memory
            log.warning("cannot cache index mappings next to %s (%s); keeping them in memory", prefix, e)
    if rank is not None:
        torch.distributed.barrier()
    if arrays is not None:
        return arrays
    cached = _load_cache(paths, key, num_samples)
    if cached is not None:
        return cached
    # Rank 0 could not write a shared cache (or the filesystem is not shared): the build is deterministic.
    return build_index_mappings(sizes, documents, num_samples, seq_length, seed)


# -- datasets -------------------------------------------------------------------------------------
class GPTDataset(torch.utils.data.Dataset):
    """Samples of `seq_length + 1` tokens from one split of one indexed dataset."""

    def __init__(
        self,
        name: str,
        prefix: str,
        indexed: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
    ) -> None:
        if seq_length < 1:
            raise AquilaError(f"seq_length must be >= 1, got {seq_length}")
        self.name, self.indexed, self.seq_length = name, indexed, seq_length
        self.doc_idx, self.sample_idx, self.shuffle_idx = load_or_build_index_mappings(
            prefix, name, indexed.sizes, documents, num_samples, seq_length, seed
        )

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def tokens(self, sample: int) -> np.ndarray:
        """Tokens of sample `sample` in stream order (before shuffling)."""
        (d0, o0), (d1, o1) = self.sample_idx[sample], self.sample_idx[sample + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        if d0 == d1:
            return self.indexed.get(int(self.doc_idx[d0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [self.indexed.get(int(self.doc_idx[d0]), o0)]
        parts += [self.indexed.get(int(self.doc_idx[d])) for d in range(d0 + 1, d1)]
        parts.append(self.indexed.get(int(self.doc_idx[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        idx = int(idx) % len(self)
        return {"input_ids": self.tokens(int(self.shuffle_idx[idx]))}


def blend_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, sample index within that dataset) for `size` blended samples.

    Dataset d's k-th sample is due at time (k + 0.5) / w_d; merging the due times gives an order whose
    every prefix holds each dataset's share to within one sample (vectorised; no per-sample loop).
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.ceil(w * size).astype(np.int64) + 1
    ds = np.repeat(np.arange(len(w)), counts)
    k = np.concatenate([np.arange(c) for c in counts])
    due = (k + 0.5) / np.where(w[ds] > 0, w[ds], np.nan)
    due = np.nan_to_num(due, nan=np.inf)
    order = np.lexsort((ds, due))[:size]
    dtype = np.uint8 if len(w) < 256 else np.int32
    return ds[order].astype(dtype), k[order]


class BlendableDataset(torch.utils.data.Dataset):
    """`size` samples drawn from several datasets in proportion to `weights`, deterministically."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise AquilaError("blend: need one weight per dataset")
        self.datasets = list(datasets)
        self.size = size
        self.dataset_index, self.dataset_sample_index = blend_indices(weights, size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        idx = int(idx) % self.size
        ds = self.datasets[int(self.dataset_index[idx])]
        return ds[int(self.dataset_sample_index[idx]) % len(ds)]


def parse_data_prefix(data_prefix: str | Sequence) -> list[tuple[float, str]]:
    """ "p", ["p"] or [w1, p1, w2, p2, ...] -> [(normalised weight, prefix)]."""
    if isinstance(data_prefix, (str, os.PathLike)):
        return [(1.0, os.fspath(data_prefix))]
    items = list(data_prefix)
    if len(items) == 1:
        return [(1.0, os.fspath(items[0]))]
    if len(items) % 2:
        raise AquilaError(f"data_prefix {items!r}: expected [weight1, prefix1, weight2, prefix2, ...]")
    pairs = []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weight = float(w)
        except (TypeError, ValueError):
            raise AquilaError(f"data_prefix: weight {w!r} before {p!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise AquilaError(f"data_prefix: weight {w!r} before {p!r} must be >= 0")
        pairs.append((weight, os.fspath(p)))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise AquilaError("data_prefix: the weights sum to 0")
    return [(w / total, p) for w, p in pairs]


def _build_single(
    prefix: str, splits_string: str, num_samples: Sequence[int], seq_length: int, seed: int
) -> list[GPTDataset | None]:
    indexed = MMapIndexedDataset(prefix)
    bounds = split_boundaries(splits_string, len(indexed))
    out: list[GPTDataset | None] = []
    for i, name in enumerate(SPLIT_NAMES):
        if bounds[i + 1] <= bounds[i]:
            out.append(None)
            continue
        documents = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
        out.append(GPTDataset(name, prefix, indexed, documents, int(num_samples[i]), seq_length, seed))
    return out


def build_pretrain_datasets(
    data_prefix: str | Sequence,
    splits_string: str,
    num_samples: Sequence[int],
    seq_length: int,
    seed: int,
    vocab_size: int | None = None,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """(train, valid, test) datasets of {"input_ids": int64[seq_length + 1]}; None for an empty split.

    `data_prefix` is one prefix or a blend [w1, prefix1, w2, prefix2, ...]; `num_samples` is (train, valid,
    test), missing trailing counts being 0 (FlagAI's [90, 10] works). A split holding documents
    has at least `num_samples[i]` samples (a whole number of epochs, like Megatron); blended splits
    have exactly `num_samples[i]` (None when 0), each dataset contributing about its weight's share.
    With `vocab_size`, every token id is checked to be below it when the data opens (one memmapped pass),
    so a bad id is one error line before training rather than an index error mid-run.
    """
    try:
        num_samples = tuple(int(n) for n in num_samples) + (0,) * (3 - len(num_samples))
    except (TypeError, ValueError):
        num_samples = (-1,)
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise AquilaError(
            f"num_samples {num_samples!r}: expected up to three non-negative integers (train, valid, test)"
        )
    parse_splits(splits_string)  # validate before touching the data
    pairs = parse_data_prefix(data_prefix)
    for _, prefix in pairs:
        if missing := missing_dataset_file(prefix):
            raise AquilaError(f"{missing}: indexed dataset not found (data prefix {prefix!r})")
        if vocab_size is not None:
            from aquila.data.check import check_vocab

            check_vocab(MMapIndexedDataset(prefix), vocab_size)
    if len(pairs) == 1:
        return tuple(_build_single(pairs[0][1], splits_string, num_samples, seq_length, seed))
    per_dataset = [
        _build_single(p, splits_string, [math.ceil(n * w * 1.005) for n in num_samples], seq_length, seed)
        for w, p in pairs
    ]
    result = []
    for i in range(3):
        members = [(w, parts[i]) for (w, _), parts in zip(pairs, per_dataset) if parts[i] is not None and w > 0]
        if not members or num_samples[i] == 0:
            result.append(None)
            continue
        result.append(BlendableDataset([d for _, d in members], [w for w, _ in members], num_samples[i]))
    return tuple(result)
