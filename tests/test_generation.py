"""Batched generation with interventions equals one-at-a-time generation."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from personaxis.generation import SamplingConfig, generate
from personaxis.interventions import Add, FloorCap

PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about yourself please."}],
    [{"role": "user", "content": "What do you fear most? Explain how rainbows form."}],
]


# float64 keeps greedy argmaxes of random tiny models away from ties; Gemma 2's eager attention yields NaN at
# left-padded positions in float64 (a transformers quirk), so it runs in float32.
@pytest.fixture(scope="module", params=[("llama", torch.float64), ("qwen2", torch.float64), ("gemma2", torch.float32)])
def lm64(request):
    kind, dtype = request.param
    return tiny_model(kind, dtype=dtype)


def test_steered_batched_equals_single(lm64):
    v = torch.randn(lm64.profile.hidden_size, generator=torch.Generator().manual_seed(3), dtype=lm64.model.dtype)
    interventions = {1: [Add(v, alpha=2.0)], 2: [FloorCap(v, tau=0.5)]}
    config = SamplingConfig(max_new_tokens=12, batch_size=8)
    batched = generate(lm64, PROMPTS, config, interventions=interventions)
    single = [generate(lm64, [p], config, interventions=interventions)[0] for p in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in single]
    plain = generate(lm64, PROMPTS, config)
    assert [g.text for g in plain] != [g.text for g in batched]


def test_alpha_zero_is_unsteered(lm64):
    config = SamplingConfig(max_new_tokens=10)
    v = torch.ones(lm64.profile.hidden_size, dtype=lm64.model.dtype)
    assert generate(lm64, PROMPTS, config, interventions={1: [Add(v, alpha=0.0)]}) == generate(lm64, PROMPTS, config)


def test_sampling_is_seeded(tiny_llama):
    config = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=7)
    assert generate(tiny_llama, PROMPTS, config) == generate(tiny_llama, PROMPTS, config)


def test_bad_configs():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_prompt_must_end_with_user(tiny_llama):
    with pytest.raises(ValueError, match="end with a user"):
        generate(tiny_llama, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
