"""Preprocessing a corpus that does not fit one machine: one shard per input file, then one merge.

Shard i is input file i tokenized alone into `<output-prefix>_shards/<i:06d>_<key>_document.{bin,idx}`,
written atomically (like every output), then marked complete by `<i:06d>.done.json` (written last: it names
the input's size and mtime, the keys and the tokenizer, so a changed input is redone). Shards run as tasks
of an existing engine, never a home-made scheduler:

- Ray (`--engine ray`, the `aquila[ray]` extra): one task per file, retried by Ray when its worker dies;
- Slurm (or any array-job scheduler): `--shard-index $SLURM_ARRAY_TASK_ID` runs shard i only.

A task killed mid-way leaves only hidden temporaries, which its retry removes; a rerun skips complete
shards. The merge (`--merge-shards`, or the end of `--engine ray`) checks that every shard is complete and
concatenates them in input-file order, so the output is byte-identical to one process over the same files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aquila.data.indexed_dataset import dataset_exists, merge_datasets
from aquila.errors import AquilaError
from aquila.io_utils import write_text_atomic


@dataclass(frozen=True)
class ShardJob:
    """What every shard of one run shares (sent to each task)."""

    tokenizer_dir: str
    output_prefix: str
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    skip_bad_lines: bool = False
    dtype: str | None = None
    checksum: bool = False

    @property
    def shard_dir(self) -> Path:
        return Path(f"{self.output_prefix}_shards")

    def shard_prefix(self, index: int) -> str:
        return os.fspath(self.shard_dir / f"{index:06d}")

    def key_prefix(self, index: int, key: str) -> str:
        return f"{self.shard_prefix(index)}_{key}_document"

    def marker(self, index: int) -> Path:
        return Path(f"{self.shard_prefix(index)}.done.json")

    def record(self, input_file: str | os.PathLike) -> dict:
        st = Path(input_file).stat()
        return {
            "input": os.fspath(Path(input_file).resolve()),
            "input_bytes": st.st_size,
            "input_mtime_ns": st.st_mtime_ns,
            "json_keys": list(self.json_keys),
            "tokenizer": os.fspath(Path(self.tokenizer_dir).resolve()),
            "append_eod": self.append_eod,
            "dtype": self.dtype,
        }

    def is_complete(self, index: int, input_file: str | os.PathLike) -> bool:
        try:
            done = json.loads(self.marker(index).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return done.get("record") == self.record(input_file) and all(
            dataset_exists(self.key_prefix(index, k)) for k in self.json_keys
        )


def run_shard(job: ShardJob, index: int, input_file: str) -> dict:
    """Tokenize input file `index` into its shard unless already complete; returns its counts."""
    from aquila.data.preprocess import PreprocessOptions, preprocess

    if job.is_complete(index, input_file):
        done = json.loads(job.marker(index).read_text(encoding="utf-8"))
        return {**done["counts"], "skipped": True}
    job.marker(index).unlink(missing_ok=True)
    options = PreprocessOptions(
        json_keys=tuple(job.json_keys),
        workers=1,
        append_eod=job.append_eod,
        skip_bad_lines=job.skip_bad_lines,
        dtype=job.dtype,
        checksum=job.checksum,
    )
    stats = preprocess(input_file, job.tokenizer_dir, job.shard_prefix(index), options)
    counts = {"docs": stats.docs, "tokens": stats.tokens, "bad_lines": stats.bad_lines, "nbytes": stats.nbytes}
    write_text_atomic(job.marker(index), json.dumps({"record": job.record(input_file), "counts": counts}) + "\n")
    return {**counts, "skipped": False}


def merge_shards(job: ShardJob, input_files: Sequence[str | os.PathLike], keep_shards: bool = True) -> list[str]:
    """Concatenate every shard, in input order, into `<output-prefix>_<key>_document` per key."""
    missing = [i for i, f in enumerate(input_files) if not job.is_complete(i, f)]
    if missing:
        names = ", ".join(f"{i} ({input_files[i]})" for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise AquilaError(f"{job.shard_dir}: shards not complete: {names}{more}; run them before merging")
    outputs = []
    for key in job.json_keys:
        out = f"{job.output_prefix}_{key}_document"
        merged = merge_datasets([job.key_prefix(i, key) for i in range(len(input_files))], out, checksum=job.checksum)
        merged.close()
        outputs.append(out)
    if not keep_shards:
        shutil.rmtree(job.shard_dir, ignore_errors=True)
    return outputs


def _ray_task(job: ShardJob, index: int, input_file: str) -> dict:
    return run_shard(job, index, input_file)


def run_with_ray(
    job: ShardJob,
    input_files: Sequence[str | os.PathLike],
    address: str | None = None,
    max_retries: int = 3,
    keep_shards: bool = False,
) -> tuple[list[str], list[dict]]:
    """Every shard as a Ray task (retried up to `max_retries` times if its worker dies), then the merge.

    Connects to `address` (e.g. "auto" inside a cluster) or, when Ray is already initialised, uses that."""
    from aquila.optional import require

    ray = require("ray", "preprocess --engine ray")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(_ray_task)
    refs = [task.remote(job, i, os.fspath(f)) for i, f in enumerate(input_files)]
    try:
        results = ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise AquilaError(str(cause) if isinstance(cause, AquilaError) else f"a Ray task failed: {e}") from None
    except ray.exceptions.WorkerCrashedError as e:
        raise AquilaError(f"a Ray task's worker died {max_retries + 1} times: {str(e).splitlines()[0]}") from None
    return merge_shards(job, input_files, keep_shards=keep_shards), results
