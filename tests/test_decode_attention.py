"""The CPU decode attention (two matrix products for one query per row) against transformers' "sdpa"."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from personaxis import decode_attention
from personaxis.decode_attention import (
    IMPLEMENTATION,
    decode_attention_forward,
    restore_attention,
    sdpa_attention,
    use_decode_attention,
)
from personaxis.generation import SamplingConfig, forward_kwargs, generate_ids


class _Module(torch.nn.Module):
    num_key_value_groups = 3


def _inputs(rows: int = 4, positions: int = 37, *, query_length: int = 1) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    query = torch.randn(rows, 6, query_length, 16)
    # Keys and values as a buffered cache holds them: views of the first positions of a longer buffer.
    key = torch.randn(rows, 2, positions + 9, 16)[:, :, :positions]
    value = torch.randn(rows, 2, positions + 9, 16)[:, :, :positions]
    mask = torch.ones(rows, 1, query_length, positions, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding
    mask[2, ..., 10:14] = False  # the gap after a shared prefix
    return query, key, value, mask


def test_one_query_per_row_equals_sdpa():
    query, key, value, mask = _inputs()
    module = _Module()
    for attention_mask in (mask, None, torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))):
        ours, weights = decode_attention_forward(module, query, key, value, attention_mask, scaling=0.3)
        theirs, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=0.3)
        assert weights is None and ours.shape == theirs.shape == (4, 1, 6, 16)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Masked positions do not count at all, whatever they hold.
    poisoned = key.clone()
    poisoned[1, :, :5] = 1e4
    torch.testing.assert_close(
        decode_attention_forward(module, query, poisoned, value, mask)[0][1],
        decode_attention_forward(module, query, key, value, mask)[0][1],
    )


def test_everything_else_goes_to_sdpa(monkeypatch):
    module = _Module()
    query, key, value, mask = _inputs(query_length=3)
    ours, _ = decode_attention_forward(module, query, key, value, mask)
    assert torch.equal(ours, sdpa_attention_forward(module, query, key, value, mask)[0])  # prefill: sdpa itself
    calls: list[dict] = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "_sdpa", recording)
    query, key, value, mask = _inputs()
    decode_attention_forward(module, query, key, value, mask)
    assert calls == []
    decode_attention_forward(module, query, key, value, mask, dropout=0.1)
    decode_attention_forward(module, query, key, value, mask, s_aux=torch.zeros(6))
    decode_attention_forward(module, query.bfloat16(), key.bfloat16(), value.bfloat16(), mask)
    assert len(calls) == 3


def test_use_and_restore_change_sdpa_models_only(tiny_llama):
    model = tiny_llama.model
    assert model.config._attn_implementation == IMPLEMENTATION  # tiny models convert, as load_model does
    with sdpa_attention(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == IMPLEMENTATION
    assert restore_attention(model) and model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    assert not use_decode_attention(model) and model.config._attn_implementation == "eager"
    model.config._attn_implementation = "sdpa"
    assert use_decode_attention(model) and model.config._attn_implementation == IMPLEMENTATION


def test_tiny_models_generate_the_same_tokens_as_with_sdpa(tiny_lm):
    """Left padding, rows joining a running batch and grouped-query heads, on every tiny architecture."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13], [14, 15, 16, 17], [18]]
    config = SamplingConfig(max_new_tokens=10, batch_size=3)
    ours = generate_ids(tiny_lm, prompts, config)
    with sdpa_attention(tiny_lm.model):
        theirs = generate_ids(tiny_lm, prompts, config)
    assert ours == theirs
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    cache_kw, _ = forward_kwargs(tiny_lm.model)
    with torch.inference_mode():
        cache = tiny_lm.model(input_ids=ids[:, :4], use_cache=True).past_key_values
        step = tiny_lm.model(input_ids=ids[:, 4:], use_cache=True, **{cache_kw: cache}).logits
        whole = tiny_lm.model(input_ids=ids).logits[:, -1:]
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="no oneDNN in this build")
def test_decode_attention_comes_with_the_onednn_layers():
    from tiny import tiny_model

    from personaxis.models import wrap_model

    lm = tiny_model("llama")
    restore_attention(lm.model)
    wrapped = wrap_model(lm.model, lm.tokenizer, fast_cpu_linears=None)
    assert wrapped.model.config._attn_implementation == IMPLEMENTATION
    restore_attention(lm.model)
    plain = wrap_model(lm.model, lm.tokenizer, fast_cpu_linears=False)
    assert plain.model.config._attn_implementation == "sdpa"
