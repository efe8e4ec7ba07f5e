"""The model runner: executes a `scheduler.StepPlan` with one cached forward, then samples right after it.

- `forward_rows` runs groups of rows (block tables, start positions, token chunks) as one cached forward of the
  model; `prefill` reads prompt chunks into tables (beam search, scoring); `decode_step` is the tensor-only
  one-token step (CUDA graphs); `pick` samples per row.
- `ModelRunner.execute` feeds every decoding sequence its newest token and every planned prompt chunk in one
  forward (every weight read once for both), then samples a token for each decoding sequence and for each
  sequence whose chunk reached the end of its context: a request's first token comes out of the same step that
  read its last prompt chunk.

`--compile` (`compile=True`): steps of decode rows only (the steady state of every stream) run the cached forward
under `torch.compile(dynamic=True)`; steps that read prompt chunks run it eager, and the runner says so once per
process in the log. Dynamo specialises every size of 0 or 1 (one row, a one-token chunk, one block, no logits
row) and the group count, so the shapes a step with chunks takes (rows, width, blocks and sampled rows of two
groups) would pass its recompile limit of 8 and fall back to eager anyway after minutes of compiling; decode-only
steps take at most 4 graphs (one or more rows, one or more blocks). tests/test_decode_scheduler.py runs a
compiled batch through every step shape under `fail_on_recompile_limit_hit=True`. `decode_step` is compiled only
by its callers (tests/test_cuda.py, bench/gpu_check_decode.py), at fixed shapes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from aquila.inference.kv_cache import BlockPool, BlockTable, PoolExhausted, group_inputs
from aquila.inference.sampling import sample
from aquila.inference.scheduler import StepPlan
from aquila.inference.sequence import SequenceState, model_device
from aquila.model import AquilaModel
from aquila.model.aquila_model import CachedRows

log = logging.getLogger(__name__)


@torch.no_grad()
def forward_rows(
    model: AquilaModel,
    pool: BlockPool,
    groups: list[tuple[list[BlockTable], list[int], list[list[int]]]],
    ends: list[list[tuple[int, int]]] | None = None,
    cached_forward: Callable | None = None,
) -> torch.Tensor:
    """One cached forward over groups of rows (tables, start positions, token chunks; every table already holds its
    chunk's positions): fp32 logits [n, V] after the tokens listed in `ends` (per group, (row, index in chunk));
    default: each row's last token."""
    device = model_device(model)
    built, logits_at, offset = [], [], 0
    for gi, (tables, starts, chunks) in enumerate(groups):
        ids, pos, slots, table_ids, last = group_inputs(tables, starts, chunks, device)
        kv_len = max(s + len(c) for s, c in zip(starts, chunks))
        built.append(CachedRows(ids, pos, slots, table_ids, kv_len))
        width = ids.shape[1]
        rows = [(i, last[i]) for i in range(len(chunks))] if ends is None else ends[gi]
        logits_at += [offset + i * width + j for i, j in rows]
        offset += ids.numel()
    at = torch.tensor(logits_at, dtype=torch.long, device=device)
    if cached_forward is not None:
        return cached_forward(model, built, pool, at)
    return model.cached_forward(built, pool, at)


@torch.no_grad()
def decode_step(
    model: AquilaModel,
    pool: BlockPool,
    tables: torch.Tensor,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
) -> torch.Tensor:
    """Tokens [b, 1] of rows with block tables [b, n] (ids, holding input_pos) at positions input_pos [b, 1]: logits
    [b, V]. Tensor ops only, so it compiles at fixed shapes (CUDA graphs: tests/test_cuda.py, bench/gpu_check_decode)."""
    bs = pool.block_size
    slots = tables.gather(1, input_pos // bs) * bs + input_pos % bs
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return model.cached_forward([CachedRows(tokens, input_pos, slots, tables, kv_len)], pool, rows)


def prefill(model: AquilaModel, pool: BlockPool, tables: list[BlockTable], chunks: list[list[int]], starts: list[int]):
    """Prompt chunks of several rows (row i from position starts[i]) into their tables; the logits [b, V] after each
    row's last chunk token."""
    for t, c, s in zip(tables, chunks, starts):
        if not t.reserve(s + len(c)):
            raise PoolExhausted(f"the KV pool has {pool.free_blocks} free blocks; a prompt chunk needs more")
    return forward_rows(model, pool, [(tables, starts, chunks)])


def pick(
    logits: torch.Tensor, seqs: Seq[SequenceState]
) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
    """One token per row from logits [b, V], each row with its own sampling parameters, seed and history; with
    `logprobs`, the chosen token's log-probability under the model (before any penalty or temperature) and the
    row's `top_logprobs` most likely (id, log-probability)."""
    want_lp = any(s.request.logprobs for s in seqs)
    lps = torch.log_softmax(logits, -1) if want_lp else None
    if all(s.request.params.greedy and s.seen is None and s.counts is None for s in seqs):
        tokens = logits.argmax(-1).tolist()
    else:
        tokens = []
        for i, s in enumerate(seqs):
            token = int(sample(logits[i : i + 1], s.request.params, s.seen, s.generator, s.counts)[0])
            if s.seen is not None:
                s.seen[0, token] = True
            if s.counts is not None:
                s.counts[0, token] += 1
            tokens.append(token)
    chosen = [float(lps[i, t]) if lps is not None else None for i, t in enumerate(tokens)]
    tops: list[list[tuple[int, float]] | None] = [None] * len(seqs)
    for i, s in enumerate(seqs):
        if lps is not None and s.request.logprobs and s.request.top_logprobs:
            best = torch.topk(lps[i], min(s.request.top_logprobs, lps.shape[-1]))
            tops[i] = list(zip(best.indices.tolist(), best.values.tolist()))
    return tokens, chosen, tops


class ModelRunner:
    """Runs step plans on one model and pool: one forward per step, then the tokens it makes due."""

    def __init__(self, model: AquilaModel, pool: BlockPool, compile: bool = False) -> None:
        self.model, self.pool = model, pool
        self.forward = forward_rows  # steps with prompt chunks (and every step without `compile`)
        self.decode_forward = compiled_forward_rows() if compile else None  # decode-only steps
        if compile:
            _say_once("--compile: decode-only steps run compiled; steps that read prompt chunks run eager")

    def execute(self, plan: StepPlan) -> list[tuple[SequenceState, str]]:
        """Run the plan's decode rows and prompt chunks in one forward; returns (sequence, new text) for each
        sequence that sampled (finished ones included)."""
        if plan.empty:
            return []
        decode, chunks = plan.decode, plan.chunks
        groups, ends = [], []
        if decode:  # one group of one-token rows: the shape a decode-only step has (compiled once)
            groups.append(([s.table for s in decode], [s.cached for s in decode], [[s.context[s.cached]] for s in decode]))  # fmt: skip
            ends.append([(i, 0) for i in range(len(decode))])
        last = [i for i, c in enumerate(chunks) if c.last]
        if chunks:
            groups.append(([c.seq.table for c in chunks], [c.start for c in chunks], [c.ids for c in chunks]))
            ends.append([(i, len(chunks[i].ids) - 1) for i in last])
        compiled = self.decode_forward is not None and not chunks
        logits = (self.decode_forward if compiled else self.forward)(self.model, self.pool, groups, ends)
        for s in decode:
            s.cached += 1
        for c in chunks:
            c.seq.cached = c.start + len(c.ids)
        for s in (*decode, *(c.seq for c in chunks)):  # blocks just filled become shareable prefixes
            if (s.cached // self.pool.block_size) > s.table.registered:
                s.table.register_full(s.context, s.cached)
        return self.sample([*decode, *(chunks[i].seq for i in last)], logits)

    @staticmethod
    def sample(seqs: list[SequenceState], logits: torch.Tensor) -> list[tuple[SequenceState, str]]:
        """A token for each sequence from its logits row, through its stop checks: (sequence, new text)."""
        if not seqs:
            return []
        tokens, lps, tops = pick(logits, seqs)
        return [(s, s.accept(t, lp, top)) for s, t, lp, top in zip(seqs, tokens, lps, tops)]


_COMPILED: dict[str | Callable, Callable] = {}
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.info(message)


def compiled_forward_rows(backend: str | Callable = "inductor") -> Callable:
    """`forward_rows` with the model's cached forward under torch.compile (dynamic shapes; compiled once per
    backend; tests use "eager" or a counting backend, whose guards and recompiles are the same as inductor's)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_cached_forward, dynamic=True, backend=backend)
    return functools.partial(forward_rows, cached_forward=_COMPILED[backend])


def _cached_forward(model: AquilaModel, groups: list[CachedRows], pool: BlockPool, logits_at) -> torch.Tensor:
    return model.cached_forward(groups, pool, logits_at)
