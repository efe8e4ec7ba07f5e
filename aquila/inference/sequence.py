"""A generation request and its decoding state, shared by the scheduler, the runner and every caller.

`Request` is what a caller asks for (prompt ids, length, sampling, seed, stops); `SequenceState` is one request
while it decodes: its block table (`kv_cache.BlockTable`), how many of its positions are cached, whether it is
reading its context, its sampler state, its ids and text, and the stop check (`accept`: stop ids, stop strings,
length and an optional predicate, all in one place). `Completion` is what the caller gets back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aquila.errors import AquilaError
from aquila.inference.kv_cache import BlockTable
from aquila.inference.sampling import SamplingParams
from aquila.inference.text import TextAssembler
from aquila.model import AquilaModel


@dataclass(frozen=True)
class Request:
    """One generation request: the type behind every Predictor method, the server and evaluation."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0))
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    stop_ids: tuple[int, ...] = ()
    strip: bool = False  # chat answers: no leading/trailing whitespace
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the most likely ids and their log-probabilities at each step
    stop_when: Callable[[list[int]], bool] | None = None  # extra stop test on the ids so far (evaluation)


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids (a final stop id excluded)
    finish_reason: str | None = None  # "stop" (a stop id, a stop string) or "length"
    prompt_tokens: int = 0
    logprobs: list[float] | None = None  # per generated id, from the model's distribution
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per generated id: the request's top_logprobs best


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_request(model: AquilaModel, r: Request, name: str = "prompt") -> None:
    vocab, limit = model.args.vocab_size, model.args.max_seq_len
    if len(r.prompt) == 0:
        raise AquilaError(f"{name} is empty")
    if len(r.prompt) >= limit:
        raise AquilaError(f"{name} has {len(r.prompt)} tokens; the model's max_seq_len {limit} leaves no room")
    bad = [t for t in r.prompt if not (0 <= int(t) < vocab)]
    if bad:
        raise AquilaError(f"{name} has token ids outside [0, {vocab}): {bad[:5]}")
    if r.max_new_tokens < 1:
        raise AquilaError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
    if r.seed is not None and not -(2**63) <= r.seed < 2**64:  # torch.Generator.manual_seed's range
        raise AquilaError(f"seed must be an integer in [-2**63, 2**64), got {r.seed}")


def cache_length(needed: int, limit: int) -> int:
    """Round the cache length up (multiples of 256) so that similar requests reuse one allocation."""
    return min(limit, -(-needed // 256) * 256)


class SequenceState:
    """A request being decoded: its blocks, how far its context is cached, its sampler and its output.

    Its context is the prompt and the tokens generated so far. While `reading`, the scheduler feeds it chunks of
    its context (the prompt, or everything so far after a preemption); the token sampled after the forward that
    read the context's end is appended, and from then on each step feeds that newest token (one position)."""

    def __init__(self, request: Request, model: AquilaModel, tokenizer=None, arrival: float | None = None) -> None:
        self.request = request
        device = model_device(model)
        self.arrival = time.monotonic() if arrival is None else arrival  # for the queue timeout and the order
        self.max_new = min(request.max_new_tokens, model.args.max_seq_len - len(request.prompt))
        self.cached = 0  # positions of this sequence already in its block table
        self.reading = True  # its context is not all cached yet (a new or preempted sequence)
        self.table: BlockTable | None = None  # its KV blocks, while it holds any
        self.logits: torch.Tensor | None = None  # [V] next-token logits handed in with `DecodeBatch.adopt`
        self.generator = None
        if request.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(int(request.seed))
        self.seen = None  # bool [1, V], only with a repetition penalty
        if request.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, model.args.vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(request.prompt, device=device)] = True
        self.counts = None  # float [1, V]: generated tokens, only with a presence or frequency penalty
        if request.params.counts_tokens:
            self.counts = torch.zeros(1, model.args.vocab_size, device=device)
        self.text = TextAssembler(tokenizer, request.stop, request.strip) if tokenizer is not None else None
        self.completion = Completion(prompt_tokens=len(request.prompt), logprobs=[] if request.logprobs else None)
        if request.logprobs and request.top_logprobs:
            self.completion.top_logprobs = []
        self.steps = 0  # tokens sampled (stop ids included)

    @property
    def context(self) -> list[int]:
        """The ids its cache holds once read: the prompt and the tokens generated so far (re-read after preemption)."""
        return [*self.request.prompt, *self.completion.token_ids]

    @property
    def prefilling(self) -> bool:
        """Reading its context (the prompt, or after a preemption everything so far) into the cache."""
        return self.reading

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason is not None

    def accept(self, token: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None) -> str:
        """Take a sampled token: the stop checks, then the newly safe text ("" when none or no tokenizer)."""
        c, r = self.completion, self.request
        self.steps += 1
        self.reading = False
        if token in r.stop_ids:
            return self.finish("stop")
        c.token_ids.append(token)
        if c.logprobs is not None and logprob is not None:
            c.logprobs.append(logprob)
        if c.top_logprobs is not None and top is not None:
            c.top_logprobs.append(top)
        piece = self.text.push([token]) if self.text is not None else ""
        if self.text is not None and self.text.stopped:
            return piece + self.finish("stop")
        if r.stop_when is not None and r.stop_when(c.token_ids):
            return piece + self.finish("stop")
        if self.steps >= self.max_new:
            return piece + self.finish("length")
        return piece

    def finish(self, reason: str) -> str:
        """End the sequence (stop, length, time limit, cancellation); returns the held-back text."""
        if self.finished:
            return ""
        self.completion.finish_reason = reason
        tail = self.text.finish() if self.text is not None else ""
        if self.text is not None:
            self.completion.text = self.text.text
        return tail
