"""Score answer choices by log-likelihood and answer greedily, computing each prompt once.

For one request (a prompt and its choices) the prompt runs once through the model into its KV cache; its last
logits give every choice's first token (so single-token choices such as " A".." D" need nothing more). The
cache rows are then copied, and the remaining tokens of up to `batch_size` choices run as one batch on top of the
shared prompt. Greedy decoding for exact match continues from the same cached prompt, through the decoding core
(`aquila.inference.generate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from aquila.errors import AquilaError
from aquila.inference.generate import DecodeBatch
from aquila.inference.generate import Request as GenerationRequest
from aquila.inference.generate import Sequence as DecodingSequence
from aquila.inference.sampling import SamplingParams
from aquila.model import AquilaModel


@dataclass(frozen=True)
class Request:
    context: list[int]  # [BOS, prompt tokens...]
    continuations: list[list[int]]  # each choice's tokens (not empty)
    max_new_tokens: int  # greedy tokens to generate for exact match (0: none)

    def length_needed(self) -> int:
        longest = max(len(c) for c in self.continuations)
        return len(self.context) + max(longest, self.max_new_tokens)


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
    def __init__(self, model: AquilaModel, batch_size: int = 16, stop_ids: Iterable[int] = ()) -> None:
        if batch_size < 1:
            raise AquilaError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.stop_ids = set(stop_ids)
        self.device = model.device

    @torch.no_grad()
    def score(self, requests: Sequence[Request], done: Callable[[list[int]], bool] | None = None) -> list[Scored]:
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
        self.model.clear_caches()
        batch = DecodeBatch(self.model, rows, need)
        try:
            return [self._score_one(r, rows, batch, done) for r in requests]
        finally:
            self.model.clear_caches()

    def _tensor(self, ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _positions(self, start: int, rows: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, device=self.device).expand(rows, n)

    def _score_one(self, r: Request, rows: int, batch: DecodeBatch, done: Callable[[list[int]], bool] | None) -> Scored:
        n = len(r.context)
        first = self.model(
            self._tensor([r.context]), input_pos=self._positions(0, 1, n), logits_at=self._tensor([n - 1])[0]
        )
        first = first["logits"][0]
        logprobs_first = first.log_softmax(-1)
        logprobs = [float(logprobs_first[c[0]]) for c in r.continuations]
        longer = [i for i, c in enumerate(r.continuations) if len(c) > 1]
        if longer:
            copies = min(rows, len(longer))
            self.model.copy_cache_rows([0] * (copies - 1), list(range(1, copies)), n)
        for chunk in _chunks(longer, rows):
            width = max(len(r.continuations[i]) - 1 for i in chunk)
            inputs = [r.continuations[i][:-1] + [0] * (width + 1 - len(r.continuations[i])) for i in chunk]
            logp = self.model(self._tensor(inputs), input_pos=self._positions(n, len(chunk), width))["logits"]
            logp = logp.log_softmax(-1)
            for row, i in enumerate(chunk):
                targets = self._tensor([r.continuations[i][1:]])[0]
                picked = logp[row, torch.arange(len(targets), device=self.device), targets]
                logprobs[i] += float(picked.double().sum())
        return Scored(logprobs, self._greedy(r, first, batch, done))

    def _greedy(
        self, r: Request, first: torch.Tensor, batch: DecodeBatch, done: Callable[[list[int]], bool] | None
    ) -> list[int]:
        """Greedy continuation of the prompt already in cache row 0, decoded by the core."""
        if r.max_new_tokens < 1:
            return []
        request = GenerationRequest(
            tuple(r.context),
            r.max_new_tokens,
            SamplingParams(temperature=0),
            stop_ids=tuple(self.stop_ids),
            stop_when=done,
        )
        seq = DecodingSequence(request, self.model)
        seq.cached, seq.logits = len(r.context), first
        batch.adopt(seq)
        while not seq.finished:
            batch.step()
        return seq.completion.token_ids
