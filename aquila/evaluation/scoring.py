"""Score answer choices by log-likelihood and answer greedily, computing each prompt once.

For one request (a prompt and its choices) the prompt runs once through the model into its KV cache; its last
logits give every choice's first token (so single-token choices such as " A".." D" need nothing more). The
cache rows are then copied, and the remaining tokens of up to `batch_size` choices run as one batch on top of the
shared prompt. Greedy decoding for exact match continues from the same cached prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from aquila.errors import AquilaError
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
        self.device = model.output.weight.device

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
        self.model.setup_caches(rows, need)
        try:
            return [self._score_one(r, rows, done) for r in requests]
        finally:
            self.model.clear_caches()

    def _tensor(self, ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _score_one(self, r: Request, rows: int, done: Callable[[list[int]], bool] | None) -> Scored:
        n = len(r.context)
        first = self.model(self._tensor([r.context]), last_only=True)["logits"][0].log_softmax(-1)
        logprobs = [float(first[c[0]]) for c in r.continuations]
        longer = [i for i, c in enumerate(r.continuations) if len(c) > 1]
        if longer:
            self._copy_prompt_rows(n, min(rows, len(longer)))
        for chunk in _chunks(longer, rows):
            width = max(len(r.continuations[i]) - 1 for i in chunk)
            inputs = [r.continuations[i][:-1] + [0] * (width + 1 - len(r.continuations[i])) for i in chunk]
            logp = self.model(self._tensor(inputs), start_pos=n)["logits"].log_softmax(-1)
            for row, i in enumerate(chunk):
                targets = self._tensor([r.continuations[i][1:]])[0]
                picked = logp[row, torch.arange(len(targets), device=self.device), targets]
                logprobs[i] += float(picked.double().sum())
        return Scored(logprobs, self._greedy(first, n, r.max_new_tokens, done))

    def _copy_prompt_rows(self, n: int, rows: int) -> None:
        """Copy the prompt's cached keys/values from row 0 to rows 1..rows-1."""
        for layer in self.model.layers:
            cache = layer.attention.kv_cache
            cache.k[1:rows, :, :n] = cache.k[:1, :, :n]
            cache.v[1:rows, :, :n] = cache.v[:1, :, :n]

    def _greedy(self, first: torch.Tensor, n: int, max_new: int, done: Callable[[list[int]], bool] | None) -> list[int]:
        out: list[int] = []
        token = int(first.argmax())
        while len(out) < max_new and token not in self.stop_ids:
            out.append(token)
            if len(out) == max_new or (done is not None and done(out)):
                break
            logits = self.model(self._tensor([[token]]), start_pos=n + len(out) - 1, last_only=True)["logits"][0]
            token = int(logits.argmax())
        return out
