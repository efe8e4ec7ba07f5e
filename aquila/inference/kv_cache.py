"""The KV cache as an object owned by whoever decodes: a pool of fixed-size blocks of positions (vLLM's layout).

`BlockPool` holds k/v of every layer as [blocks, block_size, kv_heads, head_dim] and hands blocks out; a
`BlockTable` is one sequence's list of blocks, grown block by block as its tokens arrive and returned at once when
it ends, so memory follows the tokens in use and a finished sequence leaves no hole to compact. Blocks carry
reference counts: a beam or a multiple-choice row `fork`s its parent's table, sharing every full block and copying
only the partly filled last one (the only block it would write). Block 0 is scratch space where padding tokens of a
ragged batch write; it is never handed out.
"""

from __future__ import annotations

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
    ) -> None:
        if blocks < 1 or block_size < 1:
            raise AquilaError(f"a KV pool needs at least one block of one position, got {blocks} x {block_size}")
        self.block_size, self.blocks = block_size, blocks
        shape = (layers, (blocks + 1) * block_size, kv_heads, head_dim)  # + the scratch block 0
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = [0] * (blocks + 1)
        self._free = list(range(blocks, 0, -1))  # pop() hands out low block ids first

    @classmethod
    def for_model(cls, model, positions: int, block_size: int = BLOCK_SIZE) -> BlockPool:
        """A pool holding `positions` token positions (rounded up to whole blocks) for this model."""
        a = model.args
        blocks = -(-positions // block_size)
        return cls(a.n_layers, a.kv_heads, a.head_dim, blocks, block_size, activation_dtype(model), model.device)

    # --- accounting ------------------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.blocks - len(self._free)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self) -> int:
        if not self._free:
            raise PoolExhausted(f"all {self.blocks} KV blocks are in use")
        block = self._free.pop()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        self.refs[block] += 1
        return block

    def release(self, block: int) -> None:
        if self.refs[block] < 1:
            raise AssertionError(f"block {block} released more often than taken")
        self.refs[block] -= 1
        if not self.refs[block]:
            self._free.append(block)

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
