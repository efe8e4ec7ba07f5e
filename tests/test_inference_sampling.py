"""Sampling functions: each filter alone, against transformers' logits processors, and parameter checks."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from aquila.errors import AquilaError
from aquila.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    logits_to_probs,
    sample,
    top_k_filter,
    top_p_filter,
)


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen)
    context = torch.randint(0, 50, (3, 12), generator=gen)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, context, True)
    ours = apply_repetition_penalty(logits, seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(context, logits.clone())
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_top_k_and_temperature_match_transformers():
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(2, 1, dtype=torch.long)
    theirs = TopKLogitsWarper(5)(ids, TemperatureLogitsWarper(0.7)(ids, logits.clone()))
    torch.testing.assert_close(top_k_filter(logits / 0.7, 5), theirs)
    assert (top_k_filter(logits, 5) > float("-inf")).sum(-1).tolist() == [5, 5]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, 0.7)  # 0.5 (before: 0) and 0.3 (before: 0.5) survive; 0.15 has 0.8 before it
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_logits_to_probs_is_a_distribution_within_top_k():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    probs = logits_to_probs(logits, SamplingParams(temperature=0.8, top_k=10, top_p=0.9))
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert ((probs > 0).sum(-1) <= 10).all()


def test_sample_greedy_seeded_and_penalised():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample(logits, SamplingParams(temperature=0)).tolist() == [1]
    seen = torch.tensor([[False, True, False, False]])
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=1.2), seen).tolist() == [2]
    params = SamplingParams(temperature=1.0, top_k=0)
    draws = [sample(logits, params, generator=torch.Generator().manual_seed(7)).item() for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same token
    many = sample(logits.expand(2000, -1), params, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(many, minlength=4).float() / 2000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.04, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repetition_penalty=0), "repetition_penalty"),
    ],
)
def test_bad_sampling_params_are_clear_errors(kwargs, message):
    with pytest.raises(AquilaError, match=message):
        SamplingParams(**kwargs)
