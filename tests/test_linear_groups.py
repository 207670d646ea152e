"""Sibling projections (q/k/v, gate/up) as one oneDNN product: the same numbers, the same modules and parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from personaxis import kernels
from personaxis.activations import extract_turn_means
from personaxis.generation import SamplingConfig, generate_ids
from personaxis.kernels import restore_linears, torch_linears, use_onednn_linears
from personaxis.linear_groups import LinearGroup, dissolve_groups, group_sibling_linears

from .tiny import TINY_KINDS, tiny_model

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch build has no oneDNN")


class Attention(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(24, 16, bias=bias), nn.Linear(24, 8), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x).sum(-1, keepdim=True) * self.k_proj(x) + self.v_proj(x)


def _expected(module: Attention, x: torch.Tensor) -> list[torch.Tensor]:
    return [nn.functional.linear(x, m.weight, m.bias) for m in (module.q_proj, module.k_proj, module.v_proj)]


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = kernels.onednn_linear
    monkeypatch.setattr(kernels, "onednn_linear", lambda x, w, b=None: calls.append(1) or real(x, w, b))
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_siblings_get_their_slice_of_one_product(monkeypatch, bias):
    torch.manual_seed(0)
    module = Attention(bias)
    use_onednn_linears(module, pack=True)
    group = module.q_proj._onednn_group
    assert isinstance(group, LinearGroup) and module.v_proj._onednn_group is group
    calls = _counting(monkeypatch)
    for x in (torch.randn(3, 24), torch.randn(2, 5, 24), torch.randn(1, 1, 24)):
        expected = _expected(module, x)
        with torch.no_grad():
            got = [module.q_proj(x), module.k_proj(x), module.v_proj(x)]
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert group.state is None  # every slice handed out: neither input nor product kept
    assert len(calls) == 3  # one product per input, not three
    assert module.q_proj._onednn_weight is None  # no copy per member: the group's packed weight serves them


def test_any_order_and_other_inputs_give_each_layer_its_own_result():
    torch.manual_seed(0)
    module = Attention()
    use_onednn_linears(module, pack=True)
    x, y = torch.randn(4, 24), torch.randn(4, 24)
    ex, ey = _expected(module, x), _expected(module, y)
    with torch.no_grad():
        torch.testing.assert_close(module.v_proj(x), ex[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.k_proj(y), ey[1], rtol=1e-5, atol=1e-5)  # another input: computed anew
        torch.testing.assert_close(module.q_proj(x), ex[0], rtol=1e-5, atol=1e-5)
        x.add_(1)  # the same tensor, changed in place: not served from before
        torch.testing.assert_close(module.k_proj(x), _expected(module, x)[1], rtol=1e-5, atol=1e-5)


def test_a_group_whose_slices_go_unused_is_dissolved():
    """Siblings fed different inputs every time (cross-attention style) stop sharing and stay exact."""
    torch.manual_seed(0)
    module = Attention()
    use_onednn_linears(module, pack=True)
    for _ in range(5):
        x, y = torch.randn(2, 24), torch.randn(2, 24)
        with torch.no_grad():
            got = [module.q_proj(x), module.k_proj(y), module.v_proj(y)]
        expected = [_expected(module, x)[0], *_expected(module, y)[1:]]
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert module.q_proj._onednn_group is None and module.k_proj._onednn_group is None
    assert module.q_proj._onednn_weight is not None  # each member packed its own weight


def test_weight_changes_and_hooks_are_followed():
    torch.manual_seed(0)
    module = Attention()
    use_onednn_linears(module, pack=True)
    x = torch.randn(3, 24)
    seen: list[torch.Tensor] = []
    handle = module.k_proj.register_forward_hook(lambda m, args, out: seen.append(out) or out * 2)
    with torch.no_grad():
        module.k_proj.weight.mul_(3)
        expected = _expected(module, x)
        got = [module.q_proj(x), module.k_proj(x), module.v_proj(x)]
    handle.remove()
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0], expected[1], rtol=1e-5, atol=1e-5)  # the hook saw k's own output ...
    torch.testing.assert_close(got[1], 2 * expected[1], rtol=1e-5, atol=1e-5)  # ... and its change applied
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_models_keep_their_parameters_and_give_the_same_tokens(kind):
    lm = tiny_model(kind)
    model = lm.model
    n_layers = lm.profile.n_layers
    groups = {id(m._onednn_group) for m in model.modules() if getattr(m, "_onednn_group", None) is not None}
    assert len(groups) == 2 * n_layers  # attention q/k/v and MLP gate/up in every block
    keys = sorted(model.state_dict())
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    config = SamplingConfig(max_new_tokens=12, batch_size=2)
    convs = [[{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e f g"}]]
    grouped_tokens = generate_ids(lm, prompts, config)
    grouped_means = extract_turn_means(lm, convs)[0].means
    with torch_linears(model):
        plain_tokens = generate_ids(lm, prompts, config)
        plain_means = extract_turn_means(lm, convs)[0].means
    assert grouped_tokens == plain_tokens
    torch.testing.assert_close(grouped_means, plain_means, rtol=1e-4, atol=1e-5)
    assert sorted(model.state_dict()) == keys
    assert dissolve_groups(model) == 2 * n_layers
    assert generate_ids(lm, prompts, config) == plain_tokens  # each layer alone again
    assert group_sibling_linears(model) == 2 * n_layers
    restore_linears(model)
    assert not any("_onednn_group" in m.__dict__ for m in model.modules())


def test_groups_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(kernels.GROUPS_ENV, "0")
    module = Attention()
    use_onednn_linears(module, pack=True)
    assert module.q_proj._onednn_group is None
    unpacked = Attention()
    monkeypatch.delenv(kernels.GROUPS_ENV)
    use_onednn_linears(unpacked, pack=False)  # plain weights: nothing to share
    assert unpacked.q_proj._onednn_group is None
