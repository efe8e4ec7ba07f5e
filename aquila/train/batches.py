"""A deterministic global sample order, cut into per-rank micro-batches.

Global batch `step` holds global samples [step * G, (step + 1) * G) with G = batch_size x world x accumulation.
Micro-step m of rank r takes the `batch_size` samples starting at step * G + (m * world + r) * batch_size. The
order itself never depends on the number of ranks, so resuming needs only the consumed-samples counter, and a
run with the same G on a different number of ranks sees the same global batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from aquila.constants import IGNORE_INDEX


class SampleOrder:
    """Global sample index -> dataset index. Pretraining datasets come shuffled (identity order); SFT
    conversations are permuted per epoch with a seeded generator when `shuffle` is set."""

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        if size <= 0:
            raise ValueError("empty dataset")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def __call__(self, g: int) -> int:
        epoch, pos = divmod(int(g), self.size)
        if not self.shuffle:
            return pos
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return int(self._perm[pos])


def pretrain_collate(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(np.stack([np.asarray(it["input_ids"], dtype=np.int64) for it in items]))
    return {"input_ids": ids, "labels": ids}


class GlobalBatches:
    """Per-rank micro-batches of global batch `step` (see module docstring)."""

    def __init__(
        self,
        dataset,
        order: Callable[[int], int],
        collate: Callable[[Sequence[dict]], dict[str, torch.Tensor]],
        batch_size: int,
        world_size: int,
        rank: int,
        accumulation: int,
    ) -> None:
        self.dataset, self.order, self.collate = dataset, order, collate
        self.batch_size, self.world_size, self.rank, self.accumulation = batch_size, world_size, rank, accumulation
        self.offset = 0  # global sample index of iteration 0's first sample (resume / skip_iters shift it)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        start = self.offset + step * self.global_batch_size + (micro * self.world_size + self.rank) * self.batch_size
        items = [self.dataset[self.order(g)] for g in range(start, start + self.batch_size)]
        return self.collate(items)

    def sample_indices(self, step: int) -> list[int]:
        """Dataset indices of every sample in global batch `step` (all ranks), for messages about bad data."""
        start = self.offset + step * self.global_batch_size
        return [self.order(g) for g in range(start, start + self.global_batch_size)]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        return [self.micro_batch(step, m) for m in range(self.accumulation)]


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss: labels[:, 1:] not ignored (the model predicts position t+1 from t)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
