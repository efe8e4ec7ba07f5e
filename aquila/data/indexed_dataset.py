"""Megatron-LM "mmap" indexed dataset: a flat `.bin` of token ids plus an `.idx` index.

`.idx` layout (little-endian), byte-compatible with Megatron-LM and FlagAI:

    magic  b"MMIDIDX\\x00\\x00"  (9 bytes)
    uint64 version = 1
    uint8  dtype code (see DTYPE_CODES)
    uint64 N  number of sequences
    uint64 D  length of doc_idx (documents + 1)
    int32[N]  sizes      tokens per sequence
    int64[N]  pointers   byte offset of each sequence in `.bin`
    int64[D]  doc_idx    sequence index where each document starts; first 0, last N

`.bin` is the raw concatenation of the sequences, no header, and no checksum: a bit flip that keeps a
token id in range cannot be told from real data by the files alone. `MMapIndexedDatasetBuilder(...,
checksum=True)` (`aquila preprocess/merge-datasets --checksum`) also writes `<prefix>.crc32.json`, the
CRC-32 of every 64 MiB chunk of `.bin` and of the whole `.idx`, which `aquila check-dataset` verifies.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from aquila.errors import AquilaError
from aquila.io_utils import atomic_path, disk_errors_name, write_text_atomic

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # 34 bytes
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 for vocabularies below 65,500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def index_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def checksum_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.crc32.json")


CHECKSUM_FORMAT = "aquila-indexed-dataset-crc32"
CHECKSUM_CHUNK = 64 << 20


class ChunkedCRC:
    """CRC-32 of each `chunk`-byte piece of a byte stream fed in arbitrary pieces."""

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk, self.crcs, self._crc, self._fill, self.nbytes = chunk or CHECKSUM_CHUNK, [], 0, 0, 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.nbytes += len(view)
        while len(view):
            take = min(len(view), self.chunk - self._fill)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk:
                self.crcs.append(self._crc)
                self._crc, self._fill = 0, 0

    def digest(self) -> list[int]:
        return self.crcs + ([self._crc] if self._fill else [])


def missing_dataset_file(prefix: str | os.PathLike) -> Path | None:
    """The first of `prefix`'s `.idx` and `.bin` files that does not exist, or None when both do."""
    return next((p for p in (index_file_path(prefix), data_file_path(prefix)) if not p.is_file()), None)


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return missing_dataset_file(prefix) is None


def dtype_code(dtype: np.dtype | type | str) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        raise AquilaError(f"dtype {dt} is not storable in an indexed dataset (use one of {sorted(map(str, _CODE_OF))})")
    return _CODE_OF[dt]


_INDEX_CHUNK = 1 << 18  # index entries a builder reads or writes at a time


class _Aborted(Exception):
    pass


class MMapIndexedDatasetBuilder:
    """Stream token sequences into `<prefix>.bin` and write `<prefix>.idx` on `finalize()`.

    Both files are written under temporary names and renamed only by `finalize()`, so an interrupted
    run never leaves a half-written file with a final name. Use as a context manager to discard the
    temporaries on error:

        with MMapIndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document(ids)
            b.finalize()
    """

    def __init__(
        self, prefix: str | os.PathLike, dtype: np.dtype | type | str = np.int32, checksum: bool = False
    ) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self._crc = ChunkedCRC() if checksum else None
        self._stack = contextlib.ExitStack()
        self._bin_tmp = self._stack.enter_context(atomic_path(data_file_path(prefix)))
        self._idx_stack = contextlib.ExitStack()
        self._idx_tmp = self._idx_stack.enter_context(atomic_path(index_file_path(prefix)))
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed by finalize/abort
        # The index's sizes and document starts go to two unnamed temporary files beside the output as they come
        # (gone with the process, however it ends), and are streamed into the .idx by finalize(): memory stays
        # flat however many documents (an in-memory index took ~60 bytes a document at finalize: 30 GB for 1 TB).
        with disk_errors_name(index_file_path(prefix)):
            self._sizes = tempfile.TemporaryFile(dir=self._idx_tmp.parent, prefix=".sizes.")
            self._doc_idx = tempfile.TemporaryFile(dir=self._idx_tmp.parent, prefix=".docs.")
        self._stack.callback(self._sizes.close)
        self._stack.callback(self._doc_idx.close)
        self._n = 0  # sequences so far
        self._docs = 0  # entries of doc_idx so far (the first is its leading 0)
        self._last_doc = 0  # doc_idx's last entry
        self._put_doc_idx(np.zeros(1, np.int64))
        self._done = False

    # -- writing ---------------------------------------------------------------------------------
    def _check(self, arr: np.ndarray) -> np.ndarray:
        if self._done:
            raise AquilaError(f"indexed dataset {self.prefix}: builder already finalized")
        arr = np.asarray(arr)
        if arr.ndim != 1:
            raise AquilaError(f"indexed dataset {self.prefix}: token arrays must be 1-D, got shape {arr.shape}")
        if arr.size and arr.dtype != self.dtype and np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise AquilaError(
                    f"indexed dataset {self.prefix}: token id {int(arr.max())} does not fit dtype {self.dtype}"
                )
        return arr.astype(self.dtype, copy=False)

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence (part of the current document)."""
        arr = self._check(tokens)
        self._write(arr.tobytes(order="C"))
        self._put_sizes(np.asarray([arr.size]))

    def _put_sizes(self, sizes: np.ndarray) -> None:
        with disk_errors_name(index_file_path(self.prefix)):
            self._sizes.write(sizes.astype("<i4").tobytes())
        self._n += len(sizes)

    def _put_doc_idx(self, starts: np.ndarray) -> None:
        """Append document starts (sequence numbers), absolute."""
        with disk_errors_name(index_file_path(self.prefix)):
            self._doc_idx.write(starts.astype("<i8").tobytes())
        self._docs += len(starts)
        if len(starts):
            self._last_doc = int(starts[-1])

    def _write(self, data: bytes) -> None:
        with disk_errors_name(data_file_path(self.prefix)):
            self._bin.write(data)
        if self._crc is not None:
            self._crc.update(data)

    def end_document(self) -> None:
        """Close the current document: the next item starts a new one."""
        self._put_doc_idx(np.asarray([self._n]))

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append a one-sequence document."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: `flat_tokens` split by `lengths`."""
        arr = self._check(flat_tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != arr.size:
            raise AquilaError(f"indexed dataset {self.prefix}: lengths sum to {int(lengths.sum())}, not {arr.size}")
        self._write(memoryview(np.ascontiguousarray(arr)).cast("B"))  # no bytes copy of the tokens
        start = self._n
        self._put_sizes(lengths)
        self._put_doc_idx(np.arange(start + 1, start + len(lengths) + 1, dtype=np.int64))

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append every sequence and document of an existing dataset (same dtype)."""
        other = MMapIndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise AquilaError(f"{index_file_path(prefix)}: dtype {other.dtype} differs from the output's {self.dtype}")
        if self._done:
            raise AquilaError(f"indexed dataset {self.prefix}: builder already finalized")
        offset = self._n
        for i in range(0, len(other.sizes), _INDEX_CHUNK):
            self._put_sizes(other.sizes[i : i + _INDEX_CHUNK])
        for i in range(1, len(other.doc_idx), _INDEX_CHUNK):
            self._put_doc_idx(other.doc_idx[i : i + _INDEX_CHUNK] + offset)
        with open(data_file_path(prefix), "rb") as src:
            while chunk := src.read(16 << 20):
                self._write(chunk)
        other.close()

    # -- finishing -------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Write the index and give both files their final names (`.bin` first, `.idx` last)."""
        if self._done:
            return
        if self._last_doc != self._n:
            self.end_document()  # a trailing add_item without end_document closes its document
        with disk_errors_name(data_file_path(self.prefix)):
            self._bin.close()
        idx_bytes, idx_crc = 0, 0
        with disk_errors_name(index_file_path(self.prefix)), open(self._idx_tmp, "wb") as f:
            for part in self._index_parts():
                f.write(part)
                idx_bytes, idx_crc = idx_bytes + len(part), zlib.crc32(part, idx_crc)
        self._done = True
        sidecar = checksum_file_path(self.prefix)
        sidecar.unlink(missing_ok=True)  # an older dataset's checksums must not outlive it
        self._stack.close()
        self._idx_stack.close()
        if self._crc is not None:
            record = {
                "format": CHECKSUM_FORMAT,
                "chunk_bytes": self._crc.chunk,
                "bin_bytes": self._crc.nbytes,
                "bin_crc32": self._crc.digest(),
                "idx_bytes": idx_bytes,
                "idx_crc32": idx_crc,
            }
            write_text_atomic(sidecar, json.dumps(record) + "\n")

    def _index_parts(self) -> Iterable[bytes]:
        """The .idx bytes in pieces of at most `_INDEX_CHUNK` entries: header, sizes, pointers, doc_idx."""
        yield MAGIC + struct.pack("<QBQQ", VERSION, dtype_code(self.dtype), self._n, self._docs)
        self._sizes.flush()
        self._doc_idx.flush()
        self._sizes.seek(0)
        while chunk := self._sizes.read(4 * _INDEX_CHUNK):
            yield chunk
        self._sizes.seek(0)
        start = 0  # tokens before this chunk's first sequence
        while chunk := self._sizes.read(4 * _INDEX_CHUNK):
            sizes = np.frombuffer(chunk, "<i4").astype(np.int64)
            pointers = np.cumsum(sizes)
            end = start + int(pointers[-1])
            pointers -= sizes
            pointers += start
            pointers *= self.dtype.itemsize
            yield pointers.astype("<i8", copy=False).tobytes()
            start = end
        self._doc_idx.seek(0)
        while chunk := self._doc_idx.read(8 * _INDEX_CHUNK):
            yield chunk

    def abort(self) -> None:
        """Discard the temporary files; nothing with a final name is written."""
        if self._done:
            return
        self._done = True
        self._bin.close()
        for stack in (self._idx_stack, self._stack):
            stack.__exit__(_Aborted, _Aborted(), None)

    @property
    def num_sequences(self) -> int:
        return self._n

    def __enter__(self) -> MMapIndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.finalize()


class MMapIndexedDataset:
    """Read-only view of `<prefix>.bin/.idx` through numpy memmaps; validated on open."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise AquilaError(f"{p}: indexed dataset file not found (prefix {self.prefix!r})")
        idx_len = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != MAGIC:
            raise AquilaError(f"{idx_path}: bad magic {header[:9]!r}, expected {MAGIC!r} (not a Megatron mmap index)")
        if len(header) < HEADER_SIZE:
            raise AquilaError(f"{idx_path}: truncated header ({len(header)} of {HEADER_SIZE} bytes)")
        version, code, n, d = struct.unpack("<QBQQ", header[9:])
        if version != VERSION:
            raise AquilaError(f"{idx_path}: unsupported index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise AquilaError(f"{idx_path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
        expected = HEADER_SIZE + 12 * n + 8 * d
        if idx_len != expected:
            raise AquilaError(
                f"{idx_path}: {idx_len} bytes, expected {expected} for {n} sequences and {d} doc_idx entries"
            )
        self._dtype = np.dtype(DTYPE_CODES[code])
        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buf = self._idx_mmap
        self._sizes = np.frombuffer(buf, dtype="<i4", count=n, offset=HEADER_SIZE)
        self._pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)
        self._doc_idx = np.frombuffer(buf, dtype="<i8", count=d, offset=HEADER_SIZE + 12 * n)
        self._validate(idx_path, bin_path)
        bin_len = bin_path.stat().st_size
        if bin_len:
            self._bin_mmap = np.memmap(bin_path, mode="r", dtype=np.uint8)
        else:
            self._bin_mmap = np.zeros(0, dtype=np.uint8)

    def _validate(self, idx_path: Path, bin_path: Path) -> None:
        sizes, pointers, doc_idx = self._sizes, self._pointers, self._doc_idx
        n = len(sizes)
        itemsize = self._dtype.itemsize
        if n and sizes.min() < 0:
            raise AquilaError(f"{idx_path}: negative sequence size")
        expected_ptr = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=expected_ptr[1:])
        expected_ptr *= itemsize
        if not np.array_equal(expected_ptr, pointers):
            raise AquilaError(f"{idx_path}: pointers do not match the sequence sizes (corrupt index)")
        if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != n or (np.diff(doc_idx) < 0).any():
            raise AquilaError(f"{idx_path}: doc_idx must start at 0, end at {n} and never decrease")
        expected_bin = int(sizes.sum(dtype=np.int64)) * itemsize
        bin_len = bin_path.stat().st_size
        if bin_len != expected_bin:
            what = "truncated" if bin_len < expected_bin else "longer than its index"
            raise AquilaError(f"{bin_path}: {bin_len} bytes, expected {expected_bin} from {idx_path.name} ({what})")

    # -- access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._sizes)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset+length` of sequence `idx` (a read-only view)."""
        n = len(self._sizes)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {n} sequences")
        size = int(self._sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"offset {offset} + length {length} outside sequence {idx} of {size} tokens")
        start = int(self._pointers[idx]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin_mmap, dtype=self._dtype, count=length, offset=start)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(int(idx))

    def __iter__(self) -> Iterable[np.ndarray]:
        for i in range(len(self)):
            yield self.get(i)

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences concatenated)."""
        a, b = int(self._doc_idx[doc]), int(self._doc_idx[doc + 1])
        if a == b:
            return np.zeros(0, dtype=self._dtype)
        start = int(self._pointers[a])
        count = int(self._sizes[a:b].sum(dtype=np.int64))
        return np.frombuffer(self._bin_mmap, dtype=self._dtype, count=count, offset=start)

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self._sizes.sum(dtype=np.int64))

    def tokens(self) -> np.ndarray:
        """Every token of the dataset as one flat read-only array."""
        return np.frombuffer(self._bin_mmap, dtype=self._dtype, count=self.num_tokens)

    def close(self) -> None:
        """Drop the memmaps (they are also released when the object is garbage collected)."""
        self._bin_mmap = np.zeros(0, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"MMapIndexedDataset({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, dtype={self.dtype})"


def merge_datasets(
    prefixes: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    on_merged: Callable[[str | os.PathLike], object] | None = None,
    checksum: bool = False,
) -> MMapIndexedDataset:
    """Concatenate several datasets (same dtype) into `output_prefix`; returns the merged reader.

    `on_merged(prefix)` is called after each input is copied (e.g. to advance a progress bar)."""
    if not prefixes:
        raise AquilaError("merge: no input datasets given")
    dtypes = {}
    for p in prefixes:
        ds = MMapIndexedDataset(p)
        dtypes[os.fspath(p)] = ds.dtype
        ds.close()
    if len(set(dtypes.values())) > 1:
        raise AquilaError(f"merge: inputs have different dtypes: {', '.join(f'{k}={v}' for k, v in dtypes.items())}")
    with MMapIndexedDatasetBuilder(output_prefix, next(iter(dtypes.values())), checksum=checksum) as builder:
        for p in prefixes:
            builder.add_index(p)
            if on_merged is not None:
                on_merged(p)
    return MMapIndexedDataset(output_prefix)


def verify_checksums(prefix: str | os.PathLike) -> bool:
    """Check `.bin/.idx` against `<prefix>.crc32.json`: False when there is no sidecar, True when every chunk
    matches, an AquilaError naming the first damaged byte range otherwise."""
    sidecar = checksum_file_path(prefix)
    if not sidecar.is_file():
        return False
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        chunk, bin_bytes, bin_crcs = int(record["chunk_bytes"]), int(record["bin_bytes"]), list(record["bin_crc32"])
        idx_bytes, idx_crc = int(record["idx_bytes"]), int(record["idx_crc32"])
        if record.get("format") != CHECKSUM_FORMAT or chunk <= 0:
            raise ValueError(f"format {record.get('format')!r}, expected {CHECKSUM_FORMAT!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise AquilaError(f"{sidecar}: not a checksum file of this format ({e})") from None
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    for path, expected in ((idx_path, idx_bytes), (bin_path, bin_bytes)):
        size = path.stat().st_size
        if size != expected:
            raise AquilaError(f"{path}: {size} bytes, but {sidecar.name} recorded {expected} (changed since written)")
    if zlib.crc32(idx_path.read_bytes()) != idx_crc:
        raise AquilaError(f"{idx_path}: CRC-32 differs from {sidecar.name} (the index is damaged)")
    with open(bin_path, "rb") as f:
        for i, want in enumerate(bin_crcs):
            if zlib.crc32(f.read(chunk)) != want:
                end = min((i + 1) * chunk, bin_bytes)
                raise AquilaError(
                    f"{bin_path}: bytes {i * chunk}..{end} differ from {sidecar.name} (CRC-32 of chunk {i}; damaged data)"
                )
    return True
