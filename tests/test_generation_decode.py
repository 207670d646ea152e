"""The shared decode step (personaxis.generation.decode): rows prefilled apart, stacked onto a running batch, dropped
and trimmed of padding decode the same greedy tokens as each prompt alone (a tiny random model in float64)."""

from __future__ import annotations

import torch
from tiny import tiny_model
from torch import Tensor

from personaxis.activations import pad_batch
from personaxis.generation import cache as kv
from personaxis.generation.decode import CachedForward, DecodeBatch, mask_positions

RESERVE = 32


def prefill(forward: CachedForward, prompts: list[list[int]], buffered: bool) -> tuple[DecodeBatch, Tensor]:
    ids, mask, positions, _ = pad_batch(prompts, 0, side="left", device="cpu")
    cache = kv.new_cache(forward.model, RESERVE if buffered else None)
    logits = forward.logits(ids, mask, positions, cache)
    return DecodeBatch(cache, mask, buffered=buffered), logits.argmax(dim=-1)


def step(forward: CachedForward, batch: DecodeBatch, tokens: Tensor) -> Tensor:
    positions = batch.extend()
    return forward.logits(tokens.unsqueeze(1), batch.mask, positions, batch.cache).argmax(dim=-1)


def alone(forward: CachedForward, prompt: list[int], n: int) -> list[int]:
    batch, token = prefill(forward, [prompt], buffered=True)
    out = [int(token)]
    for _ in range(n - 1):
        token = step(forward, batch, token)
        out.append(int(token))
    return out


def test_rows_joining_and_leaving_decode_as_alone() -> None:
    lm = tiny_model("llama", dtype=torch.float64)
    forward = CachedForward.of(lm.model)
    assert kv.supports_buffer_cache(lm.model)
    rng = torch.Generator().manual_seed(0)
    vocab = lm.model.config.vocab_size
    first, second, third = (torch.randint(3, vocab, (n,), generator=rng).tolist() for n in (4, 11, 7))

    batch, tokens = prefill(forward, [first, third], buffered=True)  # third is left-padded by 4
    outputs: list[list[int]] = [[int(t)] for t in tokens]
    for _ in range(3):
        tokens = step(forward, batch, tokens)
        for out, t in zip(outputs, tokens.tolist(), strict=True):
            out.append(t)
    joining, new = prefill(forward, [second], buffered=True)  # wider than the running batch: it gets padded
    batch.stack([joining], RESERVE)
    tokens = torch.cat([tokens, new])
    outputs.append([int(new)])
    assert len(batch) == 3 and batch.width == max(len(first) + 3, len(second))
    for _ in range(3):
        tokens = step(forward, batch, tokens)
        for out, t in zip(outputs, tokens.tolist(), strict=True):
            out.append(t)

    # Dropping the widest row leaves a column that is padding in both kept rows: it is trimmed.
    width, joined = batch.width, outputs[2]
    batch.keep(torch.tensor([0, 1]))
    tokens = tokens[:2]
    outputs = outputs[:2]
    assert len(batch) == 2 and batch.width == width - 1 and bool(batch.mask[:, 0].any())
    for _ in range(4):
        tokens = step(forward, batch, tokens)
        for out, t in zip(outputs, tokens.tolist(), strict=True):
            out.append(t)

    assert outputs[0] == alone(forward, first, len(outputs[0]))
    assert outputs[1] == alone(forward, third, len(outputs[1]))
    assert joined == alone(forward, second, len(joined))


def test_positions_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]])
    assert mask_positions(mask).tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 3, 4, 5]]
    lm = tiny_model("llama", dtype=torch.float64)
    batch = DecodeBatch(kv.new_cache(lm.model, 4), mask, buffered=True)
    assert batch.extend().tolist() == [[3], [6]] and batch.width == 7


def test_several_batches_stack_at_once_with_zero_padding() -> None:
    """Three batches of different widths stacked in one call: the padding each row gets is zeros (the buffers are
    allocated uninitialised), the spare room is as asked, and every row decodes as its prompt alone."""
    lm = tiny_model("llama", dtype=torch.float64)
    forward = CachedForward.of(lm.model)
    rng = torch.Generator().manual_seed(1)
    vocab = lm.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=rng).tolist() for n in (5, 12, 3, 8)]
    parts = [prefill(forward, group, buffered=True) for group in ([prompts[0], prompts[3]], [prompts[1]], [prompts[2]])]
    batch = parts[0][0]
    widths = [part.width for part, _ in parts]
    batch.stack([part for part, _ in parts[1:]], RESERVE)
    tokens = torch.cat([t for _, t in parts])
    assert len(batch) == 4 and batch.width == max(widths) == 12
    pads = [12 - widths[0]] * 2 + [12 - w for w in widths[1:]]
    for layer in batch.cache.layers:
        assert layer.key_buffer.shape[2] == 12 + RESERVE
        for row, pad in enumerate(pads):
            assert not layer.keys[row, :, :pad].any() and not layer.values[row, :, :pad].any()
    outputs: list[list[int]] = [[int(t)] for t in tokens]
    for _ in range(5):
        tokens = step(forward, batch, tokens)
        for out, t in zip(outputs, tokens.tolist(), strict=True):
            out.append(t)
    for out, prompt in zip(outputs, [prompts[0], prompts[3], prompts[1], prompts[2]], strict=True):
        assert out == alone(forward, prompt, len(out))
