"""Next-token selection: repetition penalty, temperature, top-k, top-p, greedy. Pure functions over logits [b, V].

Order (FlagAI's, with HF's repetition penalty first): penalty -> temperature -> top-k -> softmax -> top-p ->
renormalise -> multinomial. Temperature 0 means greedy (argmax after the penalty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aquila.errors import AquilaError
from aquila.typed_config import is_int, is_number


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; repetition_penalty 1.0 = off."""

    temperature: float = 1.0
    top_k: int = 30
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not is_number(t) or not math.isfinite(t) or t < 0:
            raise AquilaError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not is_int(k, 0):
            raise AquilaError(f"top_k must be an integer >= 0 (0 = no limit), got {k!r}")
        if not is_number(p) or not (0 < p <= 1):
            raise AquilaError(f"top_p must be in (0, 1], got {p!r}")
        if not is_number(r) or not math.isfinite(r) or r <= 0:
            raise AquilaError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {r!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as HF): for every token already in the context, positive logits are divided by
    `penalty` and negative ones multiplied. `seen` is bool [b, V]; repeated occurrences do not compound."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside each row's k largest become -inf (ties at the k-th value are kept). k 0 = no filter."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter on probabilities: drop every token whose preceding cumulative mass (in descending order)
    already exceeds p, then renormalise. The most likely token always survives."""
    if p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before > p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [b, V] (fp32) for temperature > 0."""
    logits = logits.float() / params.temperature
    logits = top_k_filter(logits, params.top_k)
    return top_p_filter(torch.softmax(logits, dim=-1), params.top_p)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row, LongTensor [b]."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
