"""Operators and the hook mechanism on tiny random Llama, Qwen2 and Gemma 2 models: exact equalities."""

from __future__ import annotations

import pytest
import torch

from personaxis.hooks import hook_count, residual_hooks
from personaxis.interventions import Ablate, Add, CeilingCap, FloorCap, VectorError, apply_interventions


def _block_outputs(lm, ids, interventions=None):
    outputs: dict[int, torch.Tensor] = {}

    def reader(layer):
        return lambda h, m: outputs.__setitem__(layer, h.clone())

    with (
        apply_interventions(lm, interventions),
        residual_hooks(lm, readers={layer: [reader(layer)] for layer in range(lm.profile.n_layers)}),
    ):
        logits = lm.model(input_ids=ids).logits
    return outputs, logits


def _ids(lm, n=12):
    return torch.randint(5, len(lm.tokenizer), (2, n), generator=torch.Generator().manual_seed(1))


def test_add_changes_block_output_by_exactly_alpha_v(tiny_lm):
    ids = _ids(tiny_lm)
    v = torch.randn(tiny_lm.profile.hidden_size)
    plain, _ = _block_outputs(tiny_lm, ids)
    layer = 2
    steered, _ = _block_outputs(tiny_lm, ids, {layer: [Add(v, alpha=0.7)]})
    assert torch.equal(steered[layer], plain[layer] + 0.7 * v)
    assert torch.equal(steered[layer - 1], plain[layer - 1])
    assert not torch.equal(steered[layer + 1], plain[layer + 1])


def test_alpha_zero_gives_bit_identical_logits(tiny_lm):
    ids = _ids(tiny_lm)
    _, plain = _block_outputs(tiny_lm, ids)
    _, steered = _block_outputs(tiny_lm, ids, {1: [Add(torch.randn(tiny_lm.profile.hidden_size), alpha=0.0)]})
    assert torch.equal(plain, steered)


def test_floor_cap_never_lowers_and_lifts_to_tau():
    torch.manual_seed(0)
    v = torch.randn(16)
    u = v / v.norm()
    h = torch.randn(50, 16) * 3
    tau = 0.5
    capped = FloorCap(v, tau=tau)(h)
    before, after = h @ u, capped @ u
    assert (after >= before - 1e-6).all()
    below = before < tau
    assert below.any() and (~below).any()
    torch.testing.assert_close(after[below], torch.full_like(after[below], tau), atol=1e-5, rtol=0)
    assert torch.equal(capped[~below], h[~below])
    # the orthogonal part is untouched
    torch.testing.assert_close(capped - (capped @ u)[:, None] * u, h - (h @ u)[:, None] * u, atol=1e-5, rtol=0)


def test_ceiling_cap_mirrors_floor():
    torch.manual_seed(1)
    v = torch.randn(16)
    u = v / v.norm()
    h = torch.randn(50, 16) * 3
    capped = CeilingCap(v, tau=0.2)(h)
    before, after = h @ u, capped @ u
    assert (after <= before + 1e-6).all()
    above = before > 0.2
    torch.testing.assert_close(after[above], torch.full_like(after[above], 0.2), atol=1e-5, rtol=0)
    # ceiling on -v at -tau equals floor on v at tau
    torch.testing.assert_close(CeilingCap(-v, tau=-0.2)(h), FloorCap(v, tau=0.2)(h), atol=1e-6, rtol=0)


def test_ablate_removes_direction_and_adds_back():
    v = torch.randn(16)
    u = v / v.norm()
    h = torch.randn(8, 16)
    torch.testing.assert_close(Ablate(v)(h) @ u, torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(Ablate(v, add_back=2.0)(h) @ u, torch.full((8,), 2.0), atol=1e-5, rtol=0)


def test_operators_compose_in_order(tiny_llama):
    ids = _ids(tiny_llama)
    v = torch.randn(tiny_llama.profile.hidden_size)
    plain, _ = _block_outputs(tiny_llama, ids)
    both, _ = _block_outputs(tiny_llama, ids, {1: [Add(v, 1.0), Add(v, 2.0)]})
    assert torch.equal(both[1], (plain[1] + 1.0 * v) + 2.0 * v)


def test_hooks_removed_after_exception(tiny_lm):
    before = hook_count(tiny_lm)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_interventions(tiny_lm, {0: [Add(torch.ones(tiny_lm.profile.hidden_size))]}):
            assert hook_count(tiny_lm) > before
            raise RuntimeError("boom")
    assert hook_count(tiny_lm) == before


def test_padding_positions_untouched(tiny_llama):
    lm = tiny_llama
    v = torch.ones(lm.profile.hidden_size)
    ids = _ids(lm, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    seen = {}
    with (
        apply_interventions(lm, {0: [Add(v, alpha=100.0)]}),
        residual_hooks(lm, readers={0: [lambda h, m: seen.setdefault("h", h.clone())]}),
    ):
        lm.model(input_ids=ids, attention_mask=mask)
    with residual_hooks(lm, readers={0: [lambda h, m: seen.setdefault("plain", h.clone())]}):
        lm.model(input_ids=ids, attention_mask=mask)
    assert torch.equal(seen["h"][0, :2], seen["plain"][0, :2])
    assert torch.equal(seen["h"][0, 2:], seen["plain"][0, 2:] + 100.0 * v)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda lm: {lm.profile.n_layers: [Add(torch.ones(lm.profile.hidden_size))]}, "out of range"),
        (lambda lm: {0: [Add(torch.ones(lm.profile.hidden_size + 1))]}, "hidden size"),
    ],
)
def test_bad_interventions_are_refused(tiny_llama, bad, match):
    with pytest.raises((IndexError, VectorError), match=match):
        with apply_interventions(tiny_llama, bad(tiny_llama)):
            pass
    assert hook_count(tiny_llama) == 0


@pytest.mark.parametrize(
    "vector, match",
    [(torch.zeros(8), "all zeros"), (torch.tensor([float("nan")] * 8), "NaN"), (torch.ones(2, 8), "1-D")],
)
def test_bad_vectors_are_refused(vector, match):
    with pytest.raises(VectorError, match=match):
        FloorCap(vector, tau=0.0)
