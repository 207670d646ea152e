"""Batched response-token extraction equals one-at-a-time extraction and a hand computation."""

from __future__ import annotations

import pytest
import torch

from personaxis.activations import extract_turn_means, length_batches
from personaxis.chat import ConversationError, render_chat

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Arr, I am the terror of the seven seas, matey!"},
    ],
    [
        {"role": "user", "content": "Explain how rainbows form."},
        {"role": "assistant", "content": "Light bends in the drops."},
        {"role": "user", "content": "And the moon?"},
        {"role": "assistant", "content": "The moon is a quiet ghost of the sun, friend."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
]


def _by_hand(lm, conversation):
    """Mean of ``hidden_states[l + 1]`` over each response span. transformers applies the final norm to the last
    entry of ``hidden_states``, so the last block's raw output is read there through a plain forward hook."""
    chat = render_chat(lm.tokenizer, conversation, lm.profile)
    ids = torch.tensor([chat.input_ids])
    last = {}
    handle = lm.layers[-1].register_forward_hook(
        lambda m, a, out: last.setdefault("h", out if torch.is_tensor(out) else out[0])
    )
    try:
        with torch.no_grad():
            hidden = list(lm.model(input_ids=ids, output_hidden_states=True).hidden_states)
    finally:
        handle.remove()
    hidden[-1] = last["h"]
    return torch.stack(
        [
            torch.stack([hidden[layer + 1][0, s.start : s.end].float().mean(0) for layer in range(lm.profile.n_layers)])
            for s in chat.spans
        ]
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_single_and_by_hand(tiny_lm, side):
    batched = extract_turn_means(tiny_lm, CONVERSATIONS, padding_side=side)
    for conversation, acts in zip(CONVERSATIONS, batched, strict=True):
        single = extract_turn_means(tiny_lm, [conversation])[0]
        expected = _by_hand(tiny_lm, conversation)
        assert acts.means.shape == expected.shape
        torch.testing.assert_close(acts.means, single.means, atol=1e-4, rtol=0)
        torch.testing.assert_close(acts.means, expected, atol=1e-4, rtol=0)


def test_subset_of_layers_and_order(tiny_llama):
    full = extract_turn_means(tiny_llama, CONVERSATIONS[:1])[0]
    part = extract_turn_means(tiny_llama, CONVERSATIONS[:1], layers=[2, 0])[0]
    assert part.layers == [2, 0]
    torch.testing.assert_close(part.means[:, 0], full.means[:, 2], atol=1e-6, rtol=0)
    torch.testing.assert_close(part.means[:, 1], full.means[:, 0], atol=1e-6, rtol=0)


def test_forward_stops_after_deepest_layer(tiny_llama):
    calls = []
    handle = tiny_llama.layers[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        extract_turn_means(tiny_llama, CONVERSATIONS[:1], layers=[1])
    finally:
        handle.remove()
    assert calls == []


def test_no_logits_computed(tiny_llama):
    calls = []
    handle = tiny_llama.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        extract_turn_means(tiny_llama, CONVERSATIONS)
    finally:
        handle.remove()
    assert calls == []


def test_length_batches_respect_budget():
    lengths = [5, 50, 7, 30, 30, 1]
    batches = length_batches(lengths, max_batch_size=3, max_batch_tokens=70)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) <= 3 and len(batch) * max(lengths[i] for i in batch) <= 70 or len(batch) == 1


def test_bad_inputs(tiny_llama):
    with pytest.raises(ConversationError, match="no assistant turn"):
        extract_turn_means(tiny_llama, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(IndexError, match="out of range"):
        extract_turn_means(tiny_llama, CONVERSATIONS[:1], layers=[4])
    with pytest.raises(ConversationError, match="unknown role"):
        extract_turn_means(tiny_llama, [[{"role": "wizard", "content": "hi"}]])
    with pytest.raises(ConversationError, match="empty content"):
        extract_turn_means(tiny_llama, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]])
