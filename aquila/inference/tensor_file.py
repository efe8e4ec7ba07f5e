"""Reading a safetensors file tensor by tensor into fresh memory, for loads whose weights must cost their own bytes.

safetensors' own readers map the file: the tensors they return point into the mapping, which stays resident (and
counted in the process's memory) as long as any tensor of the file lives, and whose offsets are not 64-byte
aligned (the int8 CPU kernel then needed a second, aligned copy). A model that keeps the loaded tensors as they
are (fp32) is well served by the mapping; one that converts them (int4 packing, fp16, oneDNN packing) held the
mapping beside its converted copy. Here each tensor is read with one `readinto` into a new allocation (torch
aligns CPU allocations to 64 bytes), optionally converted, and only then is the next one read, so a load peaks
at the model's bytes plus one tensor.

The format is small and fixed (safetensors' spec): 8 bytes little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data; offsets are relative to its start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
from collections.abc import Callable, Iterator

import torch

from aquila.errors import AquilaError

SAFETENSORS_CODES = {  # the dtype codes of a safetensors header (not the user-facing names: aquila/dtypes.py)
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(f, path: str) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise AquilaError(f"{path}: not a valid safetensors file (shorter than its 8-byte header length)")
    size = int.from_bytes(raw, "little")
    if size > os.fstat(f.fileno()).st_size - 8:
        raise AquilaError(f"{path}: not a valid safetensors file (header length {size} exceeds the file)")
    try:
        header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AquilaError(f"{path}: not a valid safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise AquilaError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + size


def tensor_count(path: str | os.PathLike) -> int:
    """How many tensors the file holds (its header only is read)."""
    with open(path, "rb") as f:
        return len(_header(f, str(path))[0])


def safetensors_index(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """{name: (dtype, shape, absolute data offset)} from the header only, in name order (safetensors' `load_file`
    order). Not `safe_open`: it maps the whole file privately, which fails with "Cannot allocate memory" for a file
    larger than the memory (a 29 GB fp32 7B model in 23 GB)."""
    path = str(path)
    with open(path, "rb") as f:
        header, base = _header(f, path)
    index = {}
    for name in sorted(header):
        info = header[name]
        try:
            dtype, shape, (begin, end) = SAFETENSORS_CODES[info["dtype"]], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AquilaError(f"{path}: tensor {name!r}: unsupported or malformed header entry {info!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise AquilaError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} {info['dtype']}")
        index[name] = (dtype, shape, base + begin)
    return index


def iter_safetensors(
    path: str | os.PathLike,
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    by_name: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in file order (in name order with `by_name`), each freshly allocated and read;
    `convert(name, t)` applied before the next."""
    index = safetensors_index(path)
    order = index if by_name else sorted(index, key=lambda name: index[name][2])
    with open(path, "rb") as f:
        for name in order:
            dtype, shape, offset = index[name]
            tensor = torch.empty(shape, dtype=dtype)
            if tensor.numel():
                f.seek(offset)
                if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != tensor.nbytes:
                    raise AquilaError(f"{path}: tensor {name!r}: the file ends inside its data")
            yield name, convert(name, tensor) if convert else tensor
            del tensor  # the caller may drop its reference before the next is allocated


def read_safetensors(
    path: str | os.PathLike, convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The whole file as a dict, read tensor by tensor (see the module docstring)."""
    return dict(iter_safetensors(path, convert))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system after a load (glibc's malloc_trim; no-op elsewhere).

    A load frees many temporaries of a few MB (fp32 tensors being quantized or converted) that glibc keeps in
    its heap for reuse, which would otherwise stay counted in the process's memory beside the model."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return
    if trim is not None:
        trim(0)
