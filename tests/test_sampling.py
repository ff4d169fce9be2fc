"""The sampler: exact distributions, filters, penalties, and noise that depends only on (seed, position, token)."""

from __future__ import annotations

import pytest
import torch

from hub_peft.errors import InvalidInputError
from hub_peft.serving.sampling import SamplingParams, sample_row, uniform_noise

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(params_of_seed, n=4000, logits=LOGITS, position=0):
    counts = torch.zeros(len(logits))
    for seed in range(n):
        counts[sample_row(logits, params_of_seed(seed), position, [], []).token] += 1
    return counts / n


def test_gumbel_max_samples_the_softmax_at_the_temperature():
    for temperature in (0.7, 1.0, 1.6):
        freq = draws(lambda s, t=temperature: SamplingParams(temperature=t, seed=s))
        expected = torch.softmax(LOGITS / temperature, -1)
        assert (freq - expected).abs().max() < 0.025, (temperature, freq, expected)


def test_top_k_top_p_and_min_p_keep_exactly_their_tokens_renormalised():
    freq = draws(lambda s: SamplingParams(temperature=1.0, top_k=2, seed=s))
    assert freq[2:].sum() == 0 and abs(freq[0] - torch.softmax(LOGITS[:2], -1)[0]) < 0.025
    probs = torch.softmax(LOGITS, -1)  # 0.57, 0.21, 0.13, 0.08, ...: top_p 0.8 keeps the first three
    freq = draws(lambda s: SamplingParams(temperature=1.0, top_p=0.8, seed=s))
    assert freq[3:].sum() == 0 and (freq[:3] - probs[:3] / probs[:3].sum()).abs().max() < 0.025
    freq = draws(lambda s: SamplingParams(temperature=1.0, min_p=0.2, seed=s))  # keeps p >= 0.2 * 0.57
    assert freq[3:].sum() == 0 and freq[2] > 0


def test_penalties_follow_their_definitions():
    logits = torch.tensor([3.0, 2.9, -1.0, 0.5])
    assert sample_row(logits, SamplingParams(), 0, [], []).token == 0
    # frequency 0.2 per occurrence (x2) + presence 0.1 on token 0: 3.0 - 0.5 = 2.5 < 2.9
    assert sample_row(logits, SamplingParams(frequency_penalty=0.2, presence_penalty=0.1), 2, [], [0, 0]).token == 1
    # repetition penalty divides positive logits of seen tokens (prompt or output): 3.0 / 1.1 < 2.9
    assert sample_row(logits, SamplingParams(repetition_penalty=1.1), 0, [0], []).token == 1
    assert sample_row(logits, SamplingParams(repetition_penalty=1.1), 0, [2], []).token == 0


def test_noise_is_a_pure_function_of_seed_position_and_token():
    ids = torch.arange(1000)
    a = uniform_noise(123, 5, ids)
    assert torch.equal(a, uniform_noise(123, 5, ids))
    assert torch.equal(a[[7, 3]], uniform_noise(123, 5, torch.tensor([7, 3])))  # whatever else is asked for
    assert not torch.equal(a, uniform_noise(123, 6, ids)) and not torch.equal(a, uniform_noise(124, 5, ids))
    assert a.min() > 0 and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.03
    p = SamplingParams(temperature=1.0, seed=9)
    assert (
        sample_row(LOGITS, p, 3, [], []).token
        == sample_row(LOGITS, SamplingParams(temperature=1.0, seed=9), 3, [], []).token
    )


def test_logprobs_are_the_models_own_and_bad_parameters_are_refused():
    out = sample_row(LOGITS, SamplingParams(temperature=0.5, seed=1, logprobs=3), 0, [], [])
    logprobs = torch.log_softmax(LOGITS, -1)
    assert out.logprob == pytest.approx(logprobs[out.token].item())
    assert [t for t, _ in out.top] == [0, 1, 2] and out.top[0][1] == pytest.approx(logprobs[0].item())
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"logprobs": 21}, {"stop": ("",)}, {"max_tokens": 0}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            SamplingParams(**bad)
