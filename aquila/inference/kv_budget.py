"""How big the KV block pool is: `--kv-cache-gb`, or a default that fits the machine.

The pool is allocated whole at start-up (k and v of every layer, [blocks, block_size, kv_heads, head_dim]), so
its size decides whether a model starts at all. By default it is the smaller of
- what `--max-batch` rows of full length need (more could never be used), and
- half of MemAvailable (/proc/meminfo) measured after the weights are loaded (the other half is left to the
  activations, the tokenizer and the rest of the machine); without /proc/meminfo, the full rows.
An explicit `--kv-cache-gb` (GiB, 2**30 bytes, the scratch block included) must hold one request of the longest
length the server allows, and must not exceed MemAvailable. Sequences take blocks as their tokens arrive, so a
pool smaller than the full rows still runs `--max-batch` short chats; when it runs out the scheduler queues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from aquila.errors import AquilaError
from aquila.inference.kv_cache import BlockPool, activation_dtype

MEMINFO = Path("/proc/meminfo")
GIB = 2**30


def bytes_per_position(model) -> int:
    """Bytes of k and v for one token position, all layers, in the dtype the cache holds."""
    a = model.args
    return 2 * a.n_layers * a.kv_heads * a.head_dim * activation_dtype(model).itemsize


def mem_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable in bytes, or None where /proc/meminfo (or the field) is absent."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gib_up(nbytes: int) -> str:
    """GiB rounded up to 3 significant digits, so the printed minimum is itself enough."""
    x = nbytes / GIB
    digits = max(0, 2 - math.floor(math.log10(x))) if x > 0 else 0
    return f"{math.ceil(x * 10**digits) / 10**digits:.{digits}f}"


@dataclass(frozen=True)
class KVBudget:
    blocks: int  # blocks handed out to sequences (the scratch block not counted)
    block_size: int
    bytes: int  # the pool's memory, scratch block included
    source: str  # how the size was chosen, for the start-up line

    @property
    def positions(self) -> int:
        return self.blocks * self.block_size

    def describe(self) -> str:
        """The start-up line."""
        return (
            f"KV cache: {self.blocks} blocks x {self.block_size} positions = {self.positions} positions,"
            f" {self.bytes / GIB:.2f} GiB ({self.source}; --kv-cache-gb to change)"
        )

    def health(self) -> dict:
        return {"blocks": self.blocks, "block_size": self.block_size, "bytes": self.bytes}

    def pool(self, model, prefix_cache: bool = True) -> BlockPool:
        return BlockPool.for_model(model, self.positions, self.block_size, prefix_cache)


def kv_budget(
    model,
    rows: int,
    max_len: int,
    cache_gb: float | None = None,
    block_size: int = BlockPool.BLOCK_SIZE,
    meminfo: Path = MEMINFO,
) -> KVBudget:
    """The pool size for `rows` sequences of up to `max_len` positions (see the module docstring); a one-line
    AquilaError naming --kv-cache-gb when it cannot hold one request of `max_len` or exceeds MemAvailable."""
    per_block = block_size * bytes_per_position(model)
    one_request = -(-max_len // block_size)
    minimum = (one_request + 1) * per_block  # + the scratch block
    full_rows = -(-rows * max_len // block_size)
    available = mem_available(meminfo)
    if cache_gb is not None:
        if not cache_gb > 0:
            raise AquilaError(f"--kv-cache-gb must be positive, got {cache_gb:g}")
        want = int(cache_gb * GIB)
        if available is not None and want > available:
            raise AquilaError(
                f"--kv-cache-gb {cache_gb:g} is above the {available / GIB:.2f} GiB of MemAvailable ({meminfo})"
                " after loading the model"
            )
        blocks, source = want // per_block - 1, f"--kv-cache-gb {cache_gb:g}"
    else:
        blocks, source = full_rows, f"{rows} rows x {max_len} positions"
        if available is not None and (available // 2) // per_block - 1 < full_rows:
            blocks, source = (available // 2) // per_block - 1, f"half of MemAvailable {available / GIB:.2f} GiB"
    if blocks < one_request:
        raise AquilaError(
            f"a KV cache of {(blocks + 1) * per_block / GIB:.3g} GiB ({source}) holds less than one request of"
            f" {max_len} positions: --kv-cache-gb must be at least {_gib_up(minimum)}"
        )
    return KVBudget(blocks, block_size, (blocks + 1) * per_block, source)
