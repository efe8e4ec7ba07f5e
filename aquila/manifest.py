"""manifest.json: the size and CRC32 of every file of a directory, written last by a training save and checked
by every loader (training resume, `checkpoint.ModelDir.open`: convert, quantize, generate, serve, eval).

`python -m aquila.manifest verify DIR` checks a directory; `python -m aquila.manifest write DIR` records its
files as they are now (for a directory you trust that has lost its manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aquila.errors import AquilaError, run_command
from aquila.io_utils import read_json, write_text_atomic

MANIFEST = "manifest.json"

# Files already verified in this process, with their manifest's and their own stats then: resume checks a
# checkpoint and then opens it as a model directory; a 7B checkpoint is ~100 GB to read, so it is read once.
_verified: dict[str, tuple] = {}


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def crc32s(paths: list[Path]) -> list[int]:
    """CRC32 of each file, several at once (zlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_crc32, paths))


def write_manifest(directory: str | os.PathLike) -> None:
    """Record every file under `directory` (sizes and CRC32s), atomically."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "crc32": c} for p, c in zip(files, crc32s(files))
    }
    write_text_atomic(directory / MANIFEST, json.dumps({"files": entries}, indent=1) + "\n")


def _stats(paths: list[Path]) -> tuple:
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def verify_manifest(directory: str | os.PathLike, top_level_only: bool = False, subdirs: tuple[str, ...] = ()) -> bool:
    """Check the files listed in `directory`'s manifest.json: one error naming the first bad file.
    False: there is no manifest to check. `top_level_only`: only the files directly in `directory` and in
    `subdirs` (a model directory's own files and its sharded weights, not a training step's optim/ and rng/)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return False
    wanted = read_json(path).get("files")
    if not isinstance(wanted, dict) or not all(
        isinstance(w, dict) and isinstance(w.get("bytes"), int) and isinstance(w.get("crc32"), int)
        for w in wanted.values()
    ):
        raise AquilaError(f"{path}: expected {{'files': {{name: {{'bytes': int, 'crc32': int}}}}}} (corrupt manifest)")
    if top_level_only:
        wanted = {name: w for name, w in wanted.items() if _model_file(name, subdirs)}
    for name, want in wanted.items():  # sizes first: cheap, and they catch truncation and missing shards
        f = directory / name
        if not f.is_file():
            raise AquilaError(f"{f}: missing (listed in {path})")
        if f.stat().st_size != want["bytes"]:
            raise AquilaError(f"{f}: {f.stat().st_size} bytes, expected {want['bytes']} (truncated or overwritten)")
    stamps = {name: _stats([path, directory / name]) for name in wanted}
    todo = [name for name in wanted if _verified.get(str((directory / name).resolve())) != stamps[name]]
    files = [directory / name for name in todo]
    for f, crc, name in zip(files, crc32s(files) if files else [], todo):
        if crc != wanted[name]["crc32"]:
            raise AquilaError(f"{f}: checksum differs from {path} (corrupt file)")
    for f, name in zip(files, todo):
        _verified[str(f.resolve())] = stamps[name]
    return True


def _model_file(name: str, subdirs: tuple[str, ...]) -> bool:
    return "/" not in name or name.split("/", 1)[0] in subdirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aquila.manifest", description=__doc__.split("\n\n")[1])
    p.add_argument("action", choices=["verify", "write"])
    p.add_argument("directory")
    opts = p.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        if not Path(opts.directory).is_dir():
            raise AquilaError(f"{opts.directory}: directory not found")
        if opts.action == "write":
            write_manifest(opts.directory)
            print(f"wrote {Path(opts.directory) / MANIFEST}")
        elif not verify_manifest(opts.directory):
            raise AquilaError(f"{opts.directory}: no {MANIFEST}")
        else:
            print(f"{opts.directory}: every file matches {MANIFEST}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
