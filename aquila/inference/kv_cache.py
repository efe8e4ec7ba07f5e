"""The KV cache as an object owned by whoever decodes: a pool of fixed-size blocks of positions (vLLM's layout).

`BlockPool` holds k/v of every layer as [blocks, block_size, kv_heads, head_dim] and hands blocks out; a
`BlockTable` is one sequence's list of blocks, grown block by block as its tokens arrive and returned at once when
it ends, so memory follows the tokens in use and a finished sequence leaves no hole to compact. Blocks carry
reference counts: a beam or a multiple-choice row `fork`s its parent's table, sharing every full block and copying
only the partly filled last one (the only block it would write). Block 0 is scratch space where padding tokens of a
ragged batch write; it is never handed out.

Shared prefixes (vLLM's automatic prefix caching): a full block is registered under the token ids from position 0
up to its end once written. A sequence starting to read its context first takes every registered block matching
its leading ids (reference counted; it then reads only the rest). A block no sequence references stays registered
and can still be matched until the pool needs it: unreferenced registered blocks are reused least recently used
first; a referenced block is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from aquila.errors import AquilaError


class PoolExhausted(AquilaError):
    """No free block left: the caller waits or preempts a sequence."""


def activation_dtype(model) -> torch.dtype:
    """The dtype the model's activations have: its token embedding's (int8 rows come out in their scales')."""
    emb = model.tok_embeddings
    return next(t.dtype for t in (*emb.parameters(), *emb.buffers()) if t.is_floating_point())


class BlockPool:
    BLOCK_SIZE = 16  # positions per block (vLLM's default)

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        blocks: int,
        block_size: int = BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        prefix_cache: bool = True,
    ) -> None:
        if blocks < 1 or block_size < 1:
            raise AquilaError(f"a KV pool needs at least one block of one position, got {blocks} x {block_size}")
        self.block_size, self.blocks = block_size, blocks
        shape = (layers, (blocks + 1) * block_size, kv_heads, head_dim)  # + the scratch block 0
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = [0] * (blocks + 1)
        self._free = list(range(blocks, 0, -1))  # pop() hands out low block ids first
        self.prefix_cache = prefix_cache
        self._by_prefix: dict[tuple[int, ...], int] = {}  # ids from position 0 to a full block's end -> the block
        self._prefix_of: dict[int, tuple[int, ...]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced: least recently used first
        self.prefix_hits = 0  # blocks taken from the prefix cache instead of being read

    @classmethod
    def for_model(cls, model, positions: int, block_size: int = BLOCK_SIZE, prefix_cache: bool = True) -> BlockPool:
        """A pool holding `positions` token positions (rounded up to whole blocks) for this model."""
        a = model.args
        blocks = -(-positions // block_size)
        dtype = activation_dtype(model)
        return cls(a.n_layers, a.kv_heads, a.head_dim, blocks, block_size, dtype, model.device, prefix_cache)

    # --- accounting ------------------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out: never used, or holding an unreferenced cached prefix."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence references."""
        return self.blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Registered prefix blocks (referenced or not)."""
        return len(self._prefix_of)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:  # the least recently used unreferenced prefix block leaves the cache
            block, _ = self._evictable.popitem(last=False)
            del self._by_prefix[self._prefix_of.pop(block)]
        else:
            raise PoolExhausted(f"all {self.blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        if not self.refs[block]:
            self._evictable.pop(block)
        self.refs[block] += 1
        return block

    def release(self, block: int) -> None:
        if self.refs[block] < 1:
            raise AssertionError(f"block {block} released more often than taken")
        self.refs[block] -= 1
        if not self.refs[block]:
            if block in self._prefix_of:
                self._evictable[block] = None  # most recently used last
            else:
                self._free.append(block)

    # --- shared prefixes -------------------------------------------------------------------------------------
    def register(self, block: int, prefix: tuple[int, ...]) -> None:
        """Block holds the last block_size positions of `prefix` (ids from position 0), all written."""
        if self.prefix_cache and prefix not in self._by_prefix and block not in self._prefix_of:
            self._by_prefix[prefix] = block
            self._prefix_of[block] = prefix

    def lookup(self, prefix: tuple[int, ...]) -> int | None:
        return self._by_prefix.get(prefix)

    def copy_block(self, src: int, dst: int, length: int) -> None:
        """Positions [0, length) of block src into block dst, in every layer."""
        a, b = src * self.block_size, dst * self.block_size
        self.k[:, b : b + length] = self.k[:, a : a + length]
        self.v[:, b : b + length] = self.v[:, a : a + length]


class BlockTable:
    """One sequence's blocks in a pool: position p lives at offset p % block_size of blocks[p // block_size]."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.registered = 0  # leading blocks already offered to the prefix cache

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def missing(self, positions: int) -> int:
        """Blocks still to allocate before positions [0, positions) fit."""
        return max(0, self.pool.blocks_for(positions) - len(self.blocks))

    def reserve(self, positions: int) -> bool:
        """Grow to hold positions [0, positions); False (and nothing taken) when the pool has too few free blocks."""
        need = self.missing(positions)
        if need > self.pool.free_blocks:
            return False
        self.blocks += [self.pool.allocate() for _ in range(need)]
        return True

    def fork(self, length: int) -> BlockTable:
        """A table for a sequence continuing this one after its first `length` positions: full blocks shared, the
        partly filled last block copied (the child writes there). Raises PoolExhausted when no block is free."""
        child = BlockTable(self.pool)
        full, part = divmod(length, self.pool.block_size)
        child.blocks = [self.pool.share(b) for b in self.blocks[:full]]
        if part:
            try:
                block = self.pool.allocate()
            except PoolExhausted:
                child.release()
                raise
            self.pool.copy_block(self.blocks[full], block, part)
            child.blocks.append(block)
        return child

    def release(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks = []
        self.registered = 0

    def match_prefix(self, ids: list[int]) -> int:
        """On an empty table: share the pool's cached blocks holding ids' leading full blocks (at least one id is
        left to read, for the next logits); returns the positions taken."""
        if self.blocks:
            raise AssertionError("match_prefix needs an empty table")
        bs = self.pool.block_size
        for i in range((len(ids) - 1) // bs):
            block = self.pool.lookup(tuple(ids[: (i + 1) * bs]))
            if block is None:
                break
            self.blocks.append(self.pool.share(block))
        self.pool.prefix_hits += len(self.blocks)
        self.registered = len(self.blocks)
        return len(self.blocks) * bs

    def register_full(self, ids: list[int], written: int) -> None:
        """Register this table's blocks that positions [0, written) fill (ids: the tokens there)."""
        bs = self.pool.block_size
        for i in range(self.registered, written // bs):
            self.pool.register(self.blocks[i], tuple(ids[: (i + 1) * bs]))
        self.registered = max(self.registered, written // bs)

    def slots(self, positions: list[int]) -> list[int]:
        """Flat pool indices where tokens at these positions write."""
        bs = self.pool.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in positions]


def group_inputs(
    tables: list[BlockTable], starts: list[int], chunks: list[list[int]], device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """A right-padded group of rows for the model's cached forward: row i feeds chunks[i] from position starts[i]
    through tables[i] (which must already hold those positions). Returns ids, positions, write slots (padding
    writes the scratch block), block tables [rows, blocks] (padded with the scratch block) and each row's last real
    index."""
    width = max(len(c) for c in chunks)
    nblocks = max(len(t.blocks) for t in tables)
    kv_len = max(s + len(c) for s, c in zip(starts, chunks))
    ids = [[0] * width for _ in chunks]
    pos = [[kv_len - 1] * width for _ in chunks]  # padding attends anywhere; its output is never read
    slots = [[0] * width for _ in chunks]  # scratch block 0
    rows = []
    for i, (t, start, chunk) in enumerate(zip(tables, starts, chunks)):
        n = len(chunk)
        ids[i][:n] = chunk
        pos[i][:n] = range(start, start + n)
        slots[i][:n] = t.slots(list(range(start, start + n)))
        rows.append(t.blocks + [0] * (nblocks - len(t.blocks)))

    def tensor(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    return tensor(ids), tensor(pos), tensor(slots), tensor(rows), [len(c) - 1 for c in chunks]
