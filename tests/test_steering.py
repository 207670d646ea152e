"""Steering along the axis: exact no-op at α = 0, norm units equal raw units, several layers, clear errors."""

from __future__ import annotations

import pytest
import torch

from personaxis.axis import Axis, AxisError
from personaxis.generation import SamplingConfig, generate
from personaxis.hooks import residual_hooks
from personaxis.interventions import Add, apply_interventions
from personaxis.steering import describe, steer, steering_interventions, steering_vector

PROMPTS = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "Tell me about yourself."}]]
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0, batch_size=4)


def _axis(lm, *, norms: bool = True, seed: int = 0) -> Axis:
    g = torch.Generator().manual_seed(seed)
    n, h = lm.profile.n_layers, lm.profile.hidden_size
    return Axis(
        torch.randn(n, h, generator=g),
        model=lm.profile.name,
        residual_norms=torch.rand(n, generator=g) + 0.5 if norms else None,
    )


def _texts(lm, ops, config=GREEDY):
    return [g.text for g in generate(lm, PROMPTS, config, interventions=ops)]


def test_alpha_zero_gives_exactly_the_unsteered_text(tiny_llama):
    axis = _axis(tiny_llama)
    plain = _texts(tiny_llama, None)
    for layers in (1, [0, 2, 3]):
        assert _texts(tiny_llama, steering_interventions(axis, layers, 0.0)) == plain
    sampled = SamplingConfig(max_new_tokens=12, temperature=0.8, seed=3, batch_size=4)
    assert _texts(tiny_llama, steering_interventions(axis, 2, 0.0), sampled) == _texts(tiny_llama, None, sampled)


def test_raw_units_are_the_reference_coefficient_of_the_stored_axis_row(tiny_llama):
    axis = _axis(tiny_llama)
    for alpha in (-3.0, 0.7, 5.0):
        normed = steering_interventions(axis, 2, alpha)
        assert normed[2][0].alpha == pytest.approx(alpha * float(axis.residual_norms[2]))
        coef = axis.alpha_to_raw(2, alpha) / float(axis.layer(2).norm())  # the same push in the reference's units
        raw = steering_interventions(axis, 2, coef, raw=True)
        assert torch.equal(raw[2][0].vector, axis.layer(2)) and raw[2][0].alpha == coef  # coef × the stored row
        torch.testing.assert_close(raw[2][0].alpha * raw[2][0].vector, normed[2][0].alpha * normed[2][0].vector)
        torch.testing.assert_close(steering_vector(axis, 2, coef, raw=True), coef * axis.layer(2))
        torch.testing.assert_close(steering_vector(axis, 2, alpha), normed[2][0].alpha * axis.unit(2))
    assert "axis row" in describe(axis, 2, 1.0, raw=True)


def test_steering_changes_text_and_shifts_the_stream_by_alpha_r(tiny_llama):
    axis = _axis(tiny_llama)
    assert _texts(tiny_llama, steering_interventions(axis, 1, 40.0)) != _texts(tiny_llama, None)
    last = tiny_llama.profile.n_layers - 1
    ids = torch.tensor([tiny_llama.tokenizer("Who are you?")["input_ids"]])
    seen = []
    with residual_hooks(tiny_llama, readers={last: [lambda h, m: seen.append(h.clone())]}):
        tiny_llama.base_model(input_ids=ids)
        with apply_interventions(tiny_llama, steering_interventions(axis, last, 0.5)):
            tiny_llama.base_model(input_ids=ids)
    shift = (seen[1] - seen[0]) @ axis.unit(last)
    torch.testing.assert_close(
        shift, torch.full_like(shift, 0.5 * float(axis.residual_norms[last])), atol=1e-4, rtol=1e-4
    )
    orthogonal = (seen[1] - seen[0]) - shift.unsqueeze(-1) * axis.unit(last)
    assert float(orthogonal.abs().max()) < 1e-4


def test_several_layers(tiny_llama):
    axis = _axis(tiny_llama)
    ops = steering_interventions(axis, [3, 1, 3], -0.4)
    assert list(ops) == [3, 1]
    for layer, (op,) in ops.items():
        assert isinstance(op, Add)
        assert op.alpha == pytest.approx(-0.4 * float(axis.residual_norms[layer]))
        torch.testing.assert_close(op.vector, axis.unit(layer))
    combined = _texts(tiny_llama, steering_interventions(axis, [1, 3], 30.0))
    assert combined == _texts(
        tiny_llama, {**steering_interventions(axis, 1, 30.0), **steering_interventions(axis, 3, 30.0)}
    )
    assert "L1" in describe(axis, [1, 3], 0.3) and "L3" in describe(axis, [1, 3], 0.3)


def test_steer_returns_unsteered_and_steered_pairs(tiny_llama):
    axis = _axis(tiny_llama)
    answers = steer(tiny_llama, axis, ["Who are you?", PROMPTS[1]], 2, 0.0, GREEDY)
    assert [a.prompt for a in answers] == ["Who are you?", "Tell me about yourself."]
    assert all(a.steered.text == a.unsteered.text for a in answers)
    assert [a.unsteered.text for a in answers] == _texts(tiny_llama, None)


def test_errors(tiny_llama):
    axis = _axis(tiny_llama)
    with pytest.raises(AxisError, match="residual norms"):
        steering_interventions(_axis(tiny_llama, norms=False), 1, 0.3)
    assert steering_interventions(_axis(tiny_llama, norms=False), 1, 0.3, raw=True)[1][0].alpha == 0.3
    with pytest.raises(IndexError, match="out of range"):
        steering_interventions(axis, 9, 0.3)
    with pytest.raises(AxisError, match="no steering layer"):
        steering_interventions(axis, [], 0.3)
    with pytest.raises(AxisError, match="finite"):
        steering_interventions(axis, 1, float("nan"))
    wrong = Axis(torch.randn(tiny_llama.profile.n_layers, 16), residual_norms=torch.ones(tiny_llama.profile.n_layers))
    with pytest.raises(AxisError, match="hidden size"):
        steer(tiny_llama, wrong, ["Hi"], 1, 0.3, GREEDY)
