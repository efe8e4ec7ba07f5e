"""Few-shot prompts: a header, k solved examples from the subset's pool, then the question up to its answer."""

from __future__ import annotations

import random
from collections.abc import Callable

from aquila.evaluation.tasks import Item, Subset

SHOT_SEPARATOR = "\n\n"


def select_shots(subset: Subset, index: int, k: int, seed: int) -> list[Item]:
    """k pool examples for item `index`: the first k of one order of the pool, shuffled by a generator fixed by
    (seed, task, subset). Every item of a subset gets the same examples, so its prompts share their leading tokens
    and the scorer's prefix cache reads them once per subset.

    The item itself is never among them (the next examples of the order take its place): with a leave-one-out pool
    its own position is excluded, and any pool entry with the same question text (a duplicate across splits) is
    skipped too.
    """
    item = subset.items[index]
    order = list(range(len(subset.pool)))
    random.Random(f"{seed}/{subset.task}/{subset.name}").shuffle(order)
    chosen = [j for j in order if not (subset.leave_one_out and j == index) and subset.pool[j].query != item.query]
    return [subset.pool[j] for j in chosen[:k]]


def render(subset: Subset, item: Item, shots: list[Item]) -> str:
    """header + each shot with its gold answer + the item's query (which ends where the answer goes)."""
    return subset.header + "".join(f"{s.query}{s.answer}{SHOT_SEPARATOR}" for s in shots) + item.query


def fit_context(
    encode: Callable[[str], list[int]], bos: int, subset: Subset, index: int, shots: list[Item], budget: int
) -> tuple[list[int], int, bool]:
    """Token ids [BOS, prompt...] of at most `budget` tokens: drop shots from the end until the prompt fits, and
    if the bare question is still too long keep its last tokens. Returns (ids, shots used, truncated)."""
    item = subset.items[index]
    while True:
        ids = [bos, *encode(render(subset, item, shots))]
        if len(ids) <= budget or not shots:
            break
        shots = shots[:-1]
    if len(ids) <= budget:
        return ids, len(shots), False
    return [bos, *ids[len(ids) - budget + 1 :]], 0, True
