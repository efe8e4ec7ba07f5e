"""Score answer choices by log-likelihood and answer greedily, computing each prompt once.

For one request (a prompt and its choices) the prompt runs once through the model into its KV blocks; its last
logits give every choice's first token (so single-token choices such as " A".." D" need nothing more). The
remaining tokens of up to `batch_size` choices run as one batch on top of the shared prompt: each choice's block
table shares the prompt's full blocks and copies only its partly filled last one. Greedy decoding for exact match
continues from the same cached prompt, through the decoding core (`aquila.inference.generate`).

The scorer keeps one block pool across requests (and `score` calls): a prompt first takes the pool's cached
blocks matching its leading ids (`BlockTable.match_prefix`) and reads only the rest, and its full blocks are then
registered for the next prompts (`register_full`). The few-shot examples of an MMLU subject, the same in every
prompt of it (`prompts.select_shots`), are so read once per subject. `prefix_cache=False` reads every prompt whole;
the scores are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from aquila.errors import AquilaError
from aquila.inference.generate import DecodeBatch, forward_rows, prefill
from aquila.inference.kv_cache import BlockPool, BlockTable
from aquila.inference.sampling import SamplingParams
from aquila.inference.sequence import Request as GenerationRequest
from aquila.inference.sequence import SequenceState, cache_length
from aquila.model import AquilaModel


@dataclass(frozen=True)
class ChoiceRequest:
    """One multiple-choice item to score (the generation request is `aquila.inference.sequence.Request`)."""

    context: list[int]  # [BOS, prompt tokens...]
    continuations: list[list[int]]  # each choice's tokens (not empty)
    max_new_tokens: int  # greedy tokens to generate for exact match (0: none)

    def length_needed(self) -> int:
        longest = max(len(c) for c in self.continuations)
        return len(self.context) + max(longest, self.max_new_tokens)

    def tail(self) -> int:
        """Positions a choice row or the greedy row writes after the prompt."""
        return max(max(len(c) for c in self.continuations), self.max_new_tokens)


def __getattr__(name: str):
    if name == "Request":  # this module's name for ChoiceRequest until issue 22 (one Request class remains)
        import warnings

        warnings.warn("aquila.evaluation.scoring.Request is ChoiceRequest", DeprecationWarning, stacklevel=2)
        return ChoiceRequest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Scored:
    logprobs: list[float]  # per choice: sum of its tokens' log-probabilities given the prompt
    generated: list[int]  # greedy continuation of the prompt (stop tokens excluded)

    @property
    def best(self) -> int:
        return max(range(len(self.logprobs)), key=self.logprobs.__getitem__)


def _chunks(seq: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


class ChoiceScorer:
    def __init__(
        self, model: AquilaModel, batch_size: int = 16, stop_ids: Iterable[int] = (), prefix_cache: bool = True
    ) -> None:
        if batch_size < 1:
            raise AquilaError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.stop_ids = set(stop_ids)
        self.device = model.device
        self.prefix_cache = prefix_cache
        self._batch: DecodeBatch | None = None  # its pool is kept across requests and calls (prefix reuse)
        self._hits_before = 0  # prefix hits of pools replaced by a bigger one

    @property
    def pool(self) -> BlockPool | None:
        return self._batch.pool if self._batch is not None else None

    @property
    def prefix_hits(self) -> int:
        """Blocks prompts took from the pool instead of reading them."""
        return self._hits_before + (self.pool.prefix_hits if self.pool is not None else 0)

    def _batch_for(self, need: int, rows: int, tail: int) -> DecodeBatch:
        """The kept decode batch, rebuilt (and its cached prefixes dropped) only when it cannot hold a request:
        twice the prompt (one being scored, one cached), and for each choice row and the greedy row its copied
        partial block and the blocks it writes. Lengths are rounded up (`cache_length`) so that the next subset's
        slightly longer prompts still fit."""
        bs = BlockPool.BLOCK_SIZE
        need = cache_length(need, self.model.args.max_seq_len)
        blocks = 2 * -(-need // bs) + (rows + 1) * (-(-tail // bs) + 2)
        b = self._batch
        if b is None or b.max_len < need or b.pool.blocks < blocks:
            if b is not None:
                self._hits_before += b.pool.prefix_hits
            pool = BlockPool.for_model(self.model, blocks * bs, prefix_cache=self.prefix_cache)
            self._batch = DecodeBatch(self.model, 1, max(need, b.max_len if b else 0), pool=pool)
        return self._batch

    @torch.no_grad()
    def score(self, requests: Sequence[ChoiceRequest], done: Callable[[list[int]], bool] | None = None) -> list[Scored]:
        """Score every request; greedy decoding also ends early once `done(tokens so far)` is true."""
        if not requests:
            return []
        for r in requests:
            if not r.context or not r.continuations or not all(r.continuations):
                raise AquilaError("a scoring request needs a context and non-empty choices")
        need = max(r.length_needed() for r in requests)
        if need > self.model.args.max_seq_len:
            raise AquilaError(f"a prompt needs {need} positions, more than the model's {self.model.args.max_seq_len}")
        rows = min(self.batch_size, max(len(r.continuations) for r in requests))
        batch = self._batch_for(need, rows, max(r.tail() for r in requests))
        try:
            return [self._score_one(r, rows, batch, done) for r in requests]
        finally:
            batch.close()  # every sequence's blocks back; the registered prompt blocks stay cached

    def _tensor(self, ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _score_one(
        self, r: ChoiceRequest, rows: int, batch: DecodeBatch, done: Callable[[list[int]], bool] | None
    ) -> Scored:
        n, pool = len(r.context), batch.pool
        table = BlockTable(pool)
        try:
            cached = table.match_prefix(r.context)  # leading blocks an earlier prompt read (none without the cache)
            first = prefill(self.model, pool, [table], [r.context[cached:]], [cached])[0]
            table.register_full(r.context, n)
            logprobs_first = first.log_softmax(-1)
            logprobs = [float(logprobs_first[c[0]]) for c in r.continuations]
            longer = [i for i, c in enumerate(r.continuations) if len(c) > 1]
            for chunk in _chunks(longer, rows):
                inputs = [r.continuations[i][:-1] for i in chunk]
                tables = [table.fork(n) for _ in chunk]
                try:
                    for t, ids in zip(tables, inputs):
                        t.reserve(n + len(ids))
                    ends = [[(row, j) for row, ids in enumerate(inputs) for j in range(len(ids))]]
                    logp = forward_rows(self.model, pool, [(tables, [n] * len(chunk), inputs)], ends)
                finally:
                    for t in tables:
                        t.release()
                logp = logp.log_softmax(-1)
                at = 0
                for i in chunk:
                    targets = self._tensor([r.continuations[i][1:]])[0]
                    picked = logp[at + torch.arange(len(targets), device=self.device), targets]
                    logprobs[i] += float(picked.double().sum())
                    at += len(targets)
            generated = self._greedy(r, first, table, batch, done)
        finally:
            table.release()
        return Scored(logprobs, generated)

    def _greedy(
        self,
        r: ChoiceRequest,
        first: torch.Tensor,
        table: BlockTable,
        batch: DecodeBatch,
        done: Callable[[list[int]], bool] | None,
    ) -> list[int]:
        """Greedy continuation of the prompt already in `table`, decoded by the core (on a fork of the table)."""
        if r.max_new_tokens < 1:
            return []
        request = GenerationRequest(
            tuple(r.context),
            r.max_new_tokens,
            SamplingParams(temperature=0),
            stop_ids=tuple(self.stop_ids),
            stop_when=done,
        )
        seq = SequenceState(request, self.model)
        seq.cached, seq.logits, seq.table = len(r.context), first, table.fork(len(r.context))
        batch.adopt(seq)
        while not seq.finished:
            batch.step()
        return seq.completion.token_ids
