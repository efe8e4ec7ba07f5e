"""`aquila preprocess`: tokenize a jsonl corpus into Megatron `.bin/.idx` files (FlagAI's preprocess_data_args.py).

    aquila preprocess --input data.jsonl --json-keys text --tokenizer DIR --output-prefix out/corpus --workers 4

writes `out/corpus_text_document.{bin,idx}`. Each document becomes one sequence wrapped as
[BOS] + ids + [EOS], as FlagAI's `encode_plus` does (`--append-eod`: ids + [EOS] only).

`--input` takes one or more jsonl files, or a directory (its `*.jsonl` files, sorted by name); documents
are written in that order. The input is streamed in chunks of at most `--chunk-size` lines and 1 MB
(`--chunk-bytes`); worker processes tokenize chunks while the main process writes them in input order,
so any number of workers gives byte-identical output and memory stays bounded by the chunks in flight
(2 per worker), not the input's size. `--checksum` also writes `<prefix>.crc32.json` (see check-dataset). Outputs are
written under temporary names and renamed at the end: an interrupted run leaves no file with a final name.
Blank lines are ignored and documents whose text is empty are skipped (both counted in the summary).
A line that is not a JSON object is an error naming the file and line (`--skip-bad-lines`: skipped and
counted); a line without one of `--json-keys`, or whose value is not a string, is always an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aquila.cli_help import HelpFormatter
from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder, best_dtype
from aquila.errors import AquilaError

_WORKER_TOKENIZER = None  # set in each worker process by _init_worker (never in the calling process)


@dataclass(frozen=True)
class PreprocessOptions:
    """How `preprocess` tokenizes and writes (the command line's flags of the same names)."""

    json_keys: tuple[str, ...] = ("text",)
    workers: int = 1
    chunk_size: int = 256  # at most this many lines per task given to a worker
    chunk_bytes: int = 1 << 20  # and at most about this many bytes
    append_eod: bool = False  # ids + [EOS] instead of [BOS] + ids + [EOS]
    skip_bad_lines: bool = False
    dtype: str | None = None  # None: the smallest that holds the vocabulary
    log_interval: int = 100  # documents between progress-bar updates
    quiet: bool = True  # no progress bar
    checksum: bool = False  # also write <prefix>.crc32.json

    def __post_init__(self) -> None:
        if isinstance(self.json_keys, str):
            raise AquilaError(f"json_keys: expected a sequence of keys, got the string {self.json_keys!r}")
        object.__setattr__(self, "json_keys", tuple(self.json_keys))


@dataclass
class ChunkResult:
    """What a worker returns for one chunk of lines."""

    tokens: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # key -> (flat ids, lengths)
    docs: int = 0
    bad_lines: int = 0
    blank_lines: int = 0
    empty_docs: int = 0
    nbytes: int = 0
    error: str | None = None


@dataclass
class PreprocessStats:
    docs: int = 0
    tokens: int = 0
    bad_lines: int = 0
    blank_lines: int = 0
    empty_docs: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


def load_tokenizer(directory: str | os.PathLike):
    from aquila.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(directory)


def _init_worker(tokenizer, tokenizer_dir: str) -> None:
    """A worker process's tokenizer: the parent's, inherited by a forked worker, else loaded from its directory."""
    global _WORKER_TOKENIZER
    # This worker's own environment: one process per core, so HF tokenizers' batch threads would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_dir)


def encode_chunk(
    tok,
    path: str,
    first_line: int,
    block: bytes,
    keys: Sequence[str],
    append_eod: bool,
    skip_bad: bool,
    dtype: str = "int64",
) -> ChunkResult:
    """Parse and tokenize the lines of `block` (whole lines; line numbers start at `first_line`) with `tok`.

    The chunk travels as one bytes object, not a list of lines (one copy through the pipe, no per-line pickling);
    ids come back in the output's `dtype` (a quarter of int64's bytes through the pipe for uint16)."""
    res = ChunkResult(nbytes=len(block))
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()  # the empty piece after the last newline is not a line
    texts: dict[str, list[str]] = {k: [] for k in keys}
    for lineno, line in enumerate(lines, start=first_line):
        if not line.strip():
            res.blank_lines += 1
            continue
        try:
            try:
                obj = json.loads(line)
            except RecursionError:
                raise ValueError("nested too deeply") from None
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            if skip_bad:
                res.bad_lines += 1
                continue
            res.error = f"{path}:{lineno}: not a JSON object ({str(e).splitlines()[0][:80]}); use --skip-bad-lines to skip such lines"
            break
        values = []
        for k in keys:
            if k not in obj:
                res.error = (
                    f"{path}:{lineno}: missing json key {k!r} (keys present: {', '.join(map(repr, list(obj)[:8]))})"
                )
                break
            if not isinstance(obj[k], str):
                res.error = f"{path}:{lineno}: json key {k!r} is {type(obj[k]).__name__}, expected a string"
                break
            values.append(obj[k])
        if res.error:
            break
        if not any(values):
            res.empty_docs += 1
            continue
        for k, v in zip(keys, values):
            texts[k].append(v)
        res.docs += 1
    if res.error:
        return res
    head = np.asarray([] if append_eod else [tok.token_start_id], dtype=np.int64)
    tail = np.asarray([tok.token_end_id], dtype=np.int64)
    out = np.dtype(dtype)
    for k in keys:
        encoded = encode_texts(tok, texts[k])
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + (head.size + 1)
        parts = [head, head, tail] * len(encoded)
        parts[1::3] = encoded  # [head, ids, tail] per document
        flat = np.concatenate(parts, dtype=np.int64) if encoded else np.empty(0, np.int64)
        if flat.size and out != flat.dtype and int(flat.max()) > np.iinfo(out).max:
            res.error = f"{path}:{first_line}..: token id {int(flat.max())} does not fit --dtype {out}"
            return res
        res.tokens[k] = (flat.astype(out, copy=False), lengths)
    return res


def encode_texts(tok, texts: list[str]) -> list[np.ndarray]:
    """Ids of each of `texts` as an integer array: in one batch (arrays straight from tiktoken where the
    tokenizer offers `encode_arrays`), texts over `PIECE_CHARS` piece by piece where that keeps the ids."""
    long = {i for i, t in enumerate(texts) if len(t) > PIECE_CHARS}
    if long and not cuts_keep_ids(tok):
        long = set()
    short = [t for i, t in enumerate(texts) if i not in long] if long else texts
    encode = getattr(tok, "encode_arrays", None)
    if encode is not None:
        arrays = iter(encode(short) if short else [])
    else:
        arrays = iter([np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(short)] if short else [])
    return [encode_long(tok, t) if i in long else next(arrays) for i, t in enumerate(texts)]


# A document longer than this is encoded in pieces of about this many characters (memory bounded by the piece,
# not the document: the tokenizer's per-token bookkeeping ran at ~120 bytes per input byte, 1.7 GB for 15 MB).
PIECE_CHARS = 1 << 16
# A cut right after a newline between two non-blank characters: byte-level BPE pre-tokenizers (GPT-2, NeoX,
# cl100k regexes) already split there, so the pieces' ids are the document's ids. Checked per tokenizer.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_PROBES = ("ab\ncd\nef", "def f():\n    return 1\nx = 2", "中文\n文本\n混合 text\n</s>\n[CLS]")


def cuts_keep_ids(tok) -> bool:
    """Whether cutting at `_SAFE_CUT` leaves `tok`'s ids unchanged (false e.g. for sentencepiece's leading '▁')."""
    cached = getattr(tok, "_aquila_cuts_keep_ids", None)
    if cached is None:
        cached = all(tok.encode(p) == [i for piece in _SAFE_CUT.split(p) for i in tok.encode(piece)] for p in _PROBES)
        with contextlib.suppress(AttributeError):
            tok._aquila_cuts_keep_ids = cached
    return cached


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at least `size` characters, cut only at `_SAFE_CUT` (the last may be shorter)."""
    start = 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        yield text[start : m.start()]
        start = m.start()
    yield text[start:]


def encode_long(tok, text: str) -> np.ndarray:
    """Ids of a long `text`, encoded piece by piece (as int32: ids of any vocabulary fit)."""
    return np.concatenate([np.asarray(tok.encode(piece), dtype=np.int32) for piece in text_pieces(text)])


def _encode_task(args: tuple) -> ChunkResult:
    return encode_chunk(_WORKER_TOKENIZER, *args)


CHUNK_BYTES = PreprocessOptions.chunk_bytes


def iter_chunks(path: Path, chunk_size: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, block of whole lines) for consecutive chunks of at most `chunk_size` lines and
    `chunk_bytes` bytes (a longer line is a chunk of its own), streamed in reads of about `chunk_bytes`.

    Cuts are found with bytes.rfind/count/find (C), not a Python step per line."""
    with open(path, "rb") as f:
        lineno, buf, eof = 1, b"", False
        while True:
            if len(buf) <= chunk_bytes and not eof:
                more = f.read(chunk_bytes + 1 - len(buf) + (1 << 16))
                eof = not more
                buf += more
                continue
            if not buf:
                return
            if eof and len(buf) <= chunk_bytes:
                end = len(buf)
            else:
                end = buf.rfind(b"\n", 0, chunk_bytes) + 1
            if end == 0:  # a line longer than chunk_bytes: a chunk of its own
                parts, end = [buf], buf.find(b"\n", chunk_bytes) + 1
                while end == 0 and (more := f.read(max(chunk_bytes, 1 << 20))):
                    found = more.find(b"\n")
                    parts.append(more)
                    if found >= 0:
                        end = sum(map(len, parts)) - len(more) + found + 1
                if len(parts) > 1:
                    buf = b"".join(parts)
                    eof = eof or end == 0
                if end == 0:
                    end = len(buf)
            lines = buf.count(b"\n", 0, end) + (buf[end - 1 : end] != b"\n")
            if lines > chunk_size:
                end, lines = 0, chunk_size
                for _ in range(chunk_size):
                    end = buf.find(b"\n", end) + 1
            block, buf = buf[:end], buf[end:]
            yield lineno, block
            lineno += lines


def input_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The jsonl files named by `inputs`, in order; a directory stands for its `*.jsonl` files sorted by name."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise AquilaError("--input: give at least one jsonl file or directory")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.glob("*.jsonl") if p.is_file())
            if not found:
                raise AquilaError(f"{item}: a directory with no *.jsonl files (give jsonl files or such a directory)")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise AquilaError(f"{item}: input file not found")
    return files


def _progress(total_bytes: int, quiet: bool):
    if quiet:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", disable=None, file=sys.stderr)


def preprocess(
    input_path: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    output_prefix: str | os.PathLike,
    options: PreprocessOptions = PreprocessOptions(),
) -> PreprocessStats:
    """Tokenize `input_path` (jsonl files, or directories of them) into `{output_prefix}_{key}_document.{bin,idx}`
    for each of `options.json_keys`, documents in input order. Changes no environment variable or module state of
    the calling process."""
    opts = options
    json_keys, workers, chunk_size, chunk_bytes = opts.json_keys, opts.workers, opts.chunk_size, opts.chunk_bytes
    paths = input_files(input_path)
    if workers < 1 or chunk_size < 1 or chunk_bytes < 1:
        raise AquilaError(
            f"--workers, --chunk-size and --chunk-bytes must be >= 1 (got {workers}, {chunk_size}, {chunk_bytes})"
        )
    if not json_keys:
        raise AquilaError("--json-keys: give at least one key")
    tokenizer = load_tokenizer(tokenizer_dir)
    out_dtype = np.dtype(opts.dtype) if opts.dtype else best_dtype(max(len(tokenizer), len(tokenizer.get_vocab())))
    stats = PreprocessStats()
    start = time.perf_counter()
    bar = _progress(sum(p.stat().st_size for p in paths), opts.quiet)
    last_log = 0

    def tasks() -> Iterator[tuple]:
        for path in paths:
            for first, block in iter_chunks(path, chunk_size, chunk_bytes):
                yield (str(path), first, block, json_keys, opts.append_eod, opts.skip_bad_lines, out_dtype.name)

    with contextlib.ExitStack() as stack:
        builders = {}
        for k in json_keys:
            out = f"{os.fspath(output_prefix)}_{k}_document"
            builders[k] = stack.enter_context(MMapIndexedDatasetBuilder(out, out_dtype, checksum=opts.checksum))

        def consume(res: ChunkResult) -> None:
            nonlocal last_log
            if res.error:
                raise AquilaError(res.error)
            for k, (flat, lengths) in res.tokens.items():
                builders[k].add_documents(flat, lengths)
                stats.tokens += int(flat.size)
            stats.docs += res.docs
            stats.bad_lines += res.bad_lines
            stats.blank_lines += res.blank_lines
            stats.empty_docs += res.empty_docs
            stats.nbytes += res.nbytes
            if bar is not None:
                bar.update(res.nbytes)
                if stats.docs - last_log >= opts.log_interval:
                    last_log = stats.docs
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(docs=stats.docs, docs_s=f"{stats.docs / elapsed:.0f}", refresh=False)

        try:
            if workers == 1:
                for task in tasks():
                    consume(encode_chunk(tokenizer, *task))
            else:
                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
                # A forked worker gets the loaded tokenizer as it is (fork does not pickle initargs); others load it.
                inherited = tokenizer if ctx.get_start_method() == "fork" else None
                initargs = (inherited, os.fspath(tokenizer_dir))
                # concurrent.futures, not multiprocessing.Pool: Pool.terminate() with chunks still queued (an error
                # in the middle of the input) could deadlock in CPython's task handler; the executor lets the
                # chunks in flight finish, drops the queued ones, and notices a worker that died.
                pool = ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=initargs)
                pending: deque = deque()
                try:
                    for task in tasks():  # at most 2 chunks per worker in flight: memory stays bounded
                        pending.append(pool.submit(_encode_task, task))
                        if len(pending) >= 2 * workers:
                            consume(pending.popleft().result())
                    while pending:
                        consume(pending.popleft().result())
                except BrokenProcessPool:
                    raise AquilaError(
                        "preprocess: a worker process died (killed, or out of memory?); nothing was written"
                    ) from None
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            if bar is not None:
                bar.close()
        if stats.docs == 0:
            where = paths[0] if len(paths) == 1 else f"{len(paths)} input files"
            raise AquilaError(f"{where}: no documents (empty input, or every line blank, bad or with empty text)")
        stats.outputs = [b.prefix for b in builders.values()]
    stats.seconds = time.perf_counter() - start
    return stats


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aquila preprocess", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--input", required=True, nargs="+", help="jsonl files (one document per line), or directories of *.jsonl"
    )
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract")
    p.add_argument("--tokenizer", help="tokenizer directory (vocab.json + merges.txt or tokenizer.json)")
    p.add_argument("--model-dir", help="FlagAI style: tokenizer at MODEL_DIR/MODEL_NAME")
    p.add_argument("--model-name", help="FlagAI style: tokenizer at MODEL_DIR/MODEL_NAME")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256, help="at most this many lines per task given to a worker")
    p.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help="and at most about this many bytes")
    p.add_argument("--checksum", action="store_true", help="also write <prefix>.crc32.json (check-dataset verifies)")
    p.add_argument("--append-eod", action="store_true", help="ids + [EOS] instead of [BOS] + ids + [EOS]")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count lines that are not JSON objects")
    p.add_argument("--dtype", choices=["uint16", "int32", "int64"], help="token dtype (default: by vocabulary size)")
    p.add_argument("--log-interval", type=int, default=100, help="documents between progress updates")
    p.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="accepted for FlagAI compatibility")
    p.add_argument("--split-sentences", action="store_true", help="FlagAI flag; not supported (documents stay whole)")
    p.add_argument("--keep-newlines", action="store_true", help="accepted for FlagAI compatibility (always true)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("many machines: one shard per input file, then a merge (see docs/data.md)")
    g.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: each shard a Ray task, then merge")
    g.add_argument("--ray-address", default=None, help="Ray cluster to join (default: a running one, or a local one)")
    g.add_argument("--max-retries", type=int, default=3, help="Ray retries of a task whose worker died")
    g.add_argument("--shard-index", type=int, default=None, help="run shard I only (e.g. $SLURM_ARRAY_TASK_ID)")
    g.add_argument("--merge-shards", action="store_true", help="merge the complete shards into the output")
    g.add_argument("--keep-shards", action="store_true", help="keep <output-prefix>_shards/ after merging")
    return p


def tokenizer_location(args: argparse.Namespace) -> str:
    if args.tokenizer:
        return args.tokenizer
    if args.model_dir:
        return os.path.join(args.model_dir, args.model_name) if args.model_name else args.model_dir
    raise AquilaError("give the tokenizer with --tokenizer DIR (or FlagAI's --model-dir and --model-name)")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.split_sentences:
        raise AquilaError("--split-sentences is not supported: documents are tokenized whole (FlagAI's Aquila data)")
    if args.engine == "ray" or args.shard_index is not None or args.merge_shards:
        return _sharded(args)
    options = PreprocessOptions(
        json_keys=tuple(args.json_keys),
        workers=args.workers,
        chunk_size=args.chunk_size,
        chunk_bytes=args.chunk_bytes,
        append_eod=args.append_eod,
        skip_bad_lines=args.skip_bad_lines,
        dtype=args.dtype,
        log_interval=args.log_interval,
        quiet=args.quiet,
        checksum=args.checksum,
    )
    stats = preprocess(args.input, tokenizer_location(args), args.output_prefix, options)
    secs = max(stats.seconds, 1e-9)
    print(
        f"wrote {', '.join(stats.outputs)}: {stats.docs} documents, {stats.tokens} tokens "
        f"in {stats.seconds:.1f}s ({stats.nbytes / secs / 1e6:.2f} MB/s, {stats.docs / secs:.0f} docs/s); "
        f"skipped {stats.bad_lines} bad lines, {stats.blank_lines} blank lines, {stats.empty_docs} empty documents"
    )
    return 0


def _sharded(args: argparse.Namespace) -> int:
    from aquila.data import shards

    if sum([args.engine == "ray", args.shard_index is not None, args.merge_shards]) > 1:
        raise AquilaError("give one of --engine ray, --shard-index and --merge-shards")
    files = input_files(args.input)
    job = shards.ShardJob(
        tokenizer_location(args),
        os.fspath(args.output_prefix),
        tuple(args.json_keys),
        args.append_eod,
        args.skip_bad_lines,
        args.dtype,
        args.checksum,
    )
    if args.shard_index is not None:
        if not 0 <= args.shard_index < len(files):
            raise AquilaError(
                f"--shard-index {args.shard_index}: the input has {len(files)} files (0..{len(files) - 1})"
            )
        c = shards.run_shard(job, args.shard_index, os.fspath(files[args.shard_index]))
        what = "already complete" if c["skipped"] else "wrote"
        print(
            f"shard {args.shard_index} ({files[args.shard_index]}): {what}, {c['docs']} documents, {c['tokens']} tokens"
        )
        return 0
    if args.merge_shards:
        outputs = shards.merge_shards(job, files, keep_shards=args.keep_shards)
        print(f"merged {len(files)} shards into {', '.join(outputs)}")
        return 0
    outputs, results = shards.run_with_ray(job, files, args.ray_address, args.max_retries, args.keep_shards)
    docs, tokens, skipped = (sum(r[k] for r in results) for k in ("docs", "tokens", "skipped"))
    print(
        f"wrote {', '.join(outputs)}: {docs} documents, {tokens} tokens from {len(files)} shards "
        f"({skipped} already complete)"
    )
    return 0
