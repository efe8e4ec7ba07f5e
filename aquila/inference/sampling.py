"""Next-token selection: repetition, presence and frequency penalties, temperature, top-k, top-p, greedy. Pure
functions over logits [b, V].

Order (FlagAI's, with HF's repetition penalty first): penalties -> temperature -> top-k -> softmax -> top-p ->
renormalise -> multinomial. Temperature 0 means greedy (argmax after the penalties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aquila.errors import AquilaError
from aquila.typed_config import is_int, is_number

# fp32 logits divided by a tiny temperature or repetition penalty overflow to inf and the probabilities become NaN
# (a logit of 30 / 1e-38 already does; JSON brings 1e-300 or 5e-324); vLLM clamps temperature at 0.01 for the same
# reason. The penalty's bounds leave a factor of 1e6 either way, far inside fp32's range for any real logit.
MIN_TEMPERATURE = 0.01
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-6, 1e6


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; repetition_penalty 1.0 = off; presence_penalty and
    frequency_penalty 0 = off (OpenAI's: each logit minus presence * [token generated so far] minus frequency *
    its count among the generated tokens; in [-2, 2])."""

    temperature: float = 1.0
    top_k: int = 30
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not is_number(t) or not math.isfinite(t) or (t != 0 and not MIN_TEMPERATURE <= t):
            raise AquilaError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t!r}")
        if not is_int(k, 0):
            raise AquilaError(f"top_k must be an integer >= 0 (0 = no limit), got {k!r}")
        if not is_number(p) or not (0 < p <= 1):
            raise AquilaError(f"top_p must be in (0, 1], got {p!r}")
        if not is_number(r) or not (MIN_REPETITION_PENALTY <= r <= MAX_REPETITION_PENALTY):
            raise AquilaError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1.0 = off),"
                f" got {r!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_number(value) or not (-2 <= value <= 2):
                raise AquilaError(f"{name} must be a number in [-2, 2] (0 = off), got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs the counts of the tokens generated so far (presence/frequency penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as HF): for every token already in the context, positive logits are divided by
    `penalty` and negative ones multiplied. `seen` is bool [b, V]; repeated occurrences do not compound."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logits - frequency * counts - presence * (counts > 0), `counts` [b, V] being how often
    each token was generated so far (the prompt does not count)."""
    return logits - frequency * counts - presence * (counts > 0).to(counts.dtype)


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
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token id per row, LongTensor [b]. `seen` (bool [b, V], prompt and generated tokens) for the repetition
    penalty, `counts` (float [b, V], generated tokens) for the presence and frequency penalties."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = apply_presence_frequency_penalty(
            logits.float(), counts, params.presence_penalty, params.frequency_penalty
        )
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
