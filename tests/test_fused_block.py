"""The compiled block: the module path's logits and cache to float rounding (one row and several, left-padded), the
same greedy tokens on the embedded model, the blocks' hooks run on its outputs, and the module path wherever it does
not apply."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_engine_runs_agree, tiny_model

from personaxis import compiled_gemm
from personaxis.activations import pad_batch
from personaxis.chat import build_conversation, render_prompt
from personaxis.decode_attention import use_decode_attention
from personaxis.generation import cache as kv
from personaxis.generation.decode import CachedForward, DecodeBatch
from personaxis.generation.fused_block import unfused_blocks
from personaxis.generation.llama_step import model_forward_steps
from personaxis.hooks import residual_hooks
from personaxis.interventions import Add, FloorCap


@pytest.fixture
def block_calls(monkeypatch):
    """Compiled products on, and a count of the compiled block's calls."""
    if compiled_gemm.block_function() is None:
        pytest.skip(compiled_gemm.status())
    monkeypatch.setenv("PERSONAXIS_KERNELS", "compiled")
    calls = []
    real = compiled_gemm.block_function()

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(compiled_gemm, "block_function", lambda: counted)
    return calls


def _decode(model, prompts, steps, *, fused: bool, forward: CachedForward | None = None):
    """Logits of ``steps`` greedy decode steps after the prompts' prefill, and the cache (``forward``: the model's
    step to use, else a new one)."""
    ids, mask, positions, _ = pad_batch(prompts, 0, side="left", device="cpu")
    cache = kv.new_cache(model, 4)  # room for four steps: later ones grow the buffers
    forward = forward or CachedForward.of(model)
    logits = []
    with torch.inference_mode():
        with model_forward_steps():
            first = forward.logits(ids, mask, positions, cache)
        batch = DecodeBatch(cache, mask, buffered=True)
        tokens = first.argmax(-1, keepdim=True)
        for _ in range(steps):
            positions = batch.extend()
            if fused:
                out = forward.logits(tokens, batch.mask, positions, batch.cache)
            else:
                with unfused_blocks():
                    out = forward.logits(tokens, batch.mask, positions, batch.cache)
            logits.append(out)
            tokens = out.argmax(-1, keepdim=True)
    return logits, batch.cache


def _model(kind: str = "llama"):
    lm = tiny_model(kind)
    use_decode_attention(lm.model)
    return lm


@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9]], [[5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14]]])
def test_equals_the_module_path_to_rounding(block_calls, prompts):
    """12 steps (the cache's buffers grow on the way), one row or three of different lengths (left padding): logits
    and every layer's keys and values."""
    model = _model().model
    fused, fused_cache = _decode(model, prompts, 12, fused=True)
    assert len(block_calls) == 12 * len(model.model.layers)
    block_calls.clear()
    plain, plain_cache = _decode(model, prompts, 12, fused=False)
    assert not block_calls
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_cache.layers, plain_cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


def test_one_row_with_left_padding_masks_it(block_calls):
    """A row left-padded by the prefill (as when a batch has shrunk to one row) attends to its own tokens only."""
    model = _model().model
    ids, mask, positions, _ = pad_batch([[5, 6, 7], [1, 2, 3, 4, 5, 6]], 0, side="left", device="cpu")
    ids, mask, positions = ids[:1], mask[:1], positions[:1]  # the first row, padded to the second's length
    assert not mask.all()
    results = []
    for fused in (True, False):
        cache = kv.new_cache(model, 8)
        forward = CachedForward.of(model)
        with torch.inference_mode():
            with model_forward_steps():
                forward.logits(ids, mask, positions, cache)
            batch = DecodeBatch(cache, mask, buffered=True)
            step_positions = batch.extend()
            if fused:
                results.append(forward.logits(torch.tensor([[9]]), batch.mask, step_positions, batch.cache))
            else:
                with unfused_blocks():
                    results.append(forward.logits(torch.tensor([[9]]), batch.mask, step_positions, batch.cache))
    assert block_calls
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_blocks_hooks_see_and_change_the_compiled_outputs(block_calls):
    """Interventions and readers on a block work on the compiled path's outputs as on the module path's."""
    lm = _model()
    hidden = lm.profile.hidden_size
    add = Add(torch.linspace(-1, 1, hidden), alpha=2.0)
    cap = FloorCap(torch.linspace(1, 2, hidden), tau=5.0)
    runs = {}
    for fused in (True, False):
        seen: list[torch.Tensor] = []
        writers = {1: [lambda h, m: add(h)], 2: [lambda h, m: cap(h)]}
        readers = {2: [lambda h, m, seen=seen: seen.append(h.clone())]}
        with residual_hooks(lm, writers=writers, readers=readers):
            logits, _ = _decode(lm.model, [[5, 6, 7, 8]], 4, fused=fused)
        runs[fused] = (logits, seen)
    assert block_calls
    plain, _ = _decode(lm.model, [[5, 6, 7, 8]], 4, fused=True)
    assert not torch.allclose(runs[True][0][0], plain[0])  # the writers acted
    for a, b in zip(runs[True][0], runs[False][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(runs[True][1]) == len(runs[False][1]) == 1 + 4
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["in_place", "new_storage", "new_module"])
def test_a_changed_weight_is_read_on_the_next_step(block_calls, change):
    """The blocks' structures are checked once per step: a weight changed in place, given new storage, or a layer
    replaced between two runs is what the next compiled step reads (stale pointers would give the old logits)."""
    lm = _model()
    model = lm.model
    forward = CachedForward.of(model)  # one step object for both runs: the same structures unless rechecked
    before, _ = _decode(model, [[5, 6, 7, 8]], 3, fused=True, forward=forward)
    block = model.model.layers[1]
    with torch.no_grad():
        if change == "in_place":
            block.mlp.down_proj.weight.mul_(-3.0)
        elif change == "new_storage":
            block.mlp.down_proj.weight.data = block.mlp.down_proj.weight.data * -3.0
        else:
            old = block.self_attn.o_proj
            new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
            new.weight.copy_(old.weight * -3.0)
            block.self_attn.o_proj = new  # a plain layer: the step's module path for this block
    block_calls.clear()
    fused, _ = _decode(model, [[5, 6, 7, 8]], 3, fused=True, forward=forward)
    assert block_calls
    plain, _ = _decode(model, [[5, 6, 7, 8]], 3, fused=False)
    assert not torch.allclose(before[0], plain[0], rtol=1e-3, atol=1e-3)  # the change shows
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_hook_that_changes_the_dtype_sends_the_next_block_down_the_module_path(block_calls):
    """A block's hook returning bfloat16: the next block's reserved cache position is given back and written by the
    module path (as the model's own forward would compute it), the rest stay compiled; every layer's cache as long as
    on the module path, logits to bfloat16's rounding."""
    lm = _model()
    model = lm.model
    handle = model.model.layers[1].register_forward_hook(lambda m, i, o: o.to(torch.bfloat16))
    try:
        fused, fused_cache = _decode(model, [[5, 6, 7, 8], [9, 10]], 4, fused=True)
        plain, plain_cache = _decode(model, [[5, 6, 7, 8], [9, 10]], 4, fused=False)
    finally:
        handle.remove()
    layers = len(model.model.layers)
    assert 0 < len(block_calls) < 4 * layers  # block 2 took the module path
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    for a, b in zip(fused_cache.layers, plain_cache.layers, strict=True):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(a.values, b.values, rtol=2e-2, atol=2e-2)


def test_module_path_where_the_compiled_block_does_not_apply(block_calls, monkeypatch):
    """Projection biases (Qwen2), oneDNN's products, or ``unfused_blocks``."""
    _decode(_model("qwen2").model, [[5, 6, 7]], 3, fused=True)
    _decode(_model().model, [[5, 6, 7]], 3, fused=False)
    monkeypatch.setenv("PERSONAXIS_KERNELS", "onednn")
    _decode(_model().model, [[5, 6, 7]], 3, fused=True)
    assert not block_calls


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_greedy_tokens_of_the_embedded_model_are_unchanged(block_calls, monkeypatch, isa):
    """32 greedy tokens of the embedded model, compiled blocks against the module path (AVX2 version too), one row
    and two."""
    from personaxis.models import load_model

    if isa == "avx2":
        monkeypatch.setattr(compiled_gemm, "avx512", lambda: False)
    lm = load_model()
    prompt = render_prompt(lm.tokenizer, build_conversation(None, "What is the capital of France?"), lm.profile)
    other = render_prompt(lm.tokenizer, build_conversation(None, "Name three colours."), lm.profile)
    for prompts in ([prompt], [prompt, other]):
        block_calls.clear()
        fused, _ = _decode(lm.model, prompts, 32, fused=True)
        assert len(block_calls) == 32 * len(lm.model.model.layers)
        plain, _ = _decode(lm.model, prompts, 32, fused=False)
        assert [a.argmax(-1).tolist() for a in fused] == [b.argmax(-1).tolist() for b in plain]
        assert max(float((a - b).abs().max()) for a, b in zip(fused, plain, strict=True)) < 1e-3


def test_engine_tokens_and_capture_with_compiled_blocks(block_calls):
    """Greedy and seeded sampling with an intervention and a capture of the answers' block outputs, rows joining a
    running batch: the same tokens as the module path, captured sums to rounding."""
    assert_engine_runs_agree(
        _model(), unfused_blocks, lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    )
    assert block_calls
