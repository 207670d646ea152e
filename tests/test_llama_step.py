"""The Llama-family decode step equals the model's own forward bit for bit, runs the hooks the forward would run,
and steps aside whenever it could not (foreign hooks, plain caches, other models). Its blocks run through their
modules' arithmetic here; the compiled blocks, equal to rounding, are tested in tests/test_fused_block.py."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_engine_runs_agree, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from personaxis.activations import pad_batch
from personaxis.decode_attention import use_decode_attention
from personaxis.generation import cache as kv
from personaxis.generation.decode import CachedForward, DecodeBatch
from personaxis.generation.fused_block import unfused_blocks
from personaxis.generation.llama_step import LlamaDecodeStep, model_forward_steps
from personaxis.hooks import residual_hooks
from personaxis.int8_linears import int8_available, int8_linears
from personaxis.interventions import Add, FloorCap
from personaxis.kernels import restore_linears, use_onednn_linears

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14]]  # left padding in every step


@pytest.fixture(autouse=True)
def _module_arithmetic():
    with unfused_blocks():
        yield


def _model(kind: str) -> torch.nn.Module:
    model = tiny_model(kind).model
    use_decode_attention(model)  # as load_model does where oneDNN is missing too
    return model


def _prefilled(model: torch.nn.Module) -> DecodeBatch:
    ids, mask, positions, _ = pad_batch(PROMPTS, 0, side="left", device="cpu")
    cache = kv.new_cache(model, 8)
    with model_forward_steps():
        CachedForward.of(model).logits(ids, mask, positions, cache)
    return DecodeBatch(cache, mask, buffered=True)


def _decode(model: torch.nn.Module, steps: int, *, own_forward: bool) -> tuple[list[torch.Tensor], DecodeBatch]:
    forward = CachedForward.of(model)
    batch = _prefilled(model)
    tokens = torch.tensor([[3], [4], [5]])
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            positions = batch.extend()
            if own_forward:
                with model_forward_steps():
                    assert forward.step is None or not forward.step.usable(tokens, batch.cache)
                    logits = forward.logits(tokens, batch.mask, positions, batch.cache)
            else:
                assert forward.step is not None and forward.step.usable(tokens, batch.cache)
                logits = forward.logits(tokens, batch.mask, positions, batch.cache)
            out.append(logits)
            tokens = logits.argmax(-1, keepdim=True)
    return out, batch


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "llama, unpacked", "llama, int8", "llama, compiled"])
def test_step_equals_the_model_forward_bit_for_bit(kind, monkeypatch):
    """Logits and the key/value cache after 12 steps: Qwen2's projection biases, Mistral, query/key/value as one
    product (packed oneDNN weights) or three (unpacked), int8 linear layers, and the compiled products."""
    if kind.endswith("compiled"):
        from personaxis import compiled_gemm

        if compiled_gemm.library() is None:
            pytest.skip(compiled_gemm.status())
        monkeypatch.setenv("PERSONAXIS_KERNELS", "compiled")
    model = _model(kind.split(",")[0])
    if kind.endswith("unpacked") and restore_linears(model):
        use_onednn_linears(model, pack=False)
    if kind.endswith("int8"):
        if not int8_available():
            pytest.skip("no int8 engine in this build")
        with int8_linears(model):
            ours, _ = _decode(model, 12, own_forward=False)
            theirs, _ = _decode(model, 12, own_forward=True)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        floats, _ = _decode(model, 12, own_forward=False)
        assert not torch.equal(ours[0], floats[0])  # int8 products, not the float32 shared one
        return
    ours, ours_batch = _decode(model, 12, own_forward=False)
    theirs, theirs_batch = _decode(model, 12, own_forward=True)
    if kind.endswith("compiled"):
        from personaxis.compiled_gemm import GemmWeight

        assert type(model.model.layers[0].mlp.up_proj._onednn_weight) is GemmWeight
        assert type(model.model.layers[0].self_attn.q_proj._onednn_group.weight) is GemmWeight
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours_batch.cache.layers, theirs_batch.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_blocks_only_step_equals_the_base_model_forward():
    model = _model("llama")
    base = model.model
    step = LlamaDecodeStep.of(base)
    assert step is not None and step.head is None
    batches = [_prefilled(model), _prefilled(model)]
    tokens = torch.tensor([[3], [4], [5]])
    with torch.inference_mode():
        for batch, own in zip(batches, (False, True), strict=True):
            positions = batch.extend()
            if own:
                with model_forward_steps():
                    CachedForward.of(base).feed(tokens, batch.mask, positions, batch.cache)
            else:
                CachedForward.of(base).feed(tokens, batch.mask, positions, batch.cache)
    for a, b in zip(batches[0].cache.layers, batches[1].cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys)


def test_step_runs_residual_writers_and_readers():
    """personaxis' writers (interventions) and readers see and change the same block outputs as under the model's
    forward, with the padding mask of the call."""
    lm = tiny_model("llama")
    use_decode_attention(lm.model)
    hidden = lm.profile.hidden_size
    add = Add(torch.linspace(-1, 1, hidden), alpha=2.0)
    cap = FloorCap(torch.linspace(1, 2, hidden), tau=5.0)

    def run(own_forward: bool) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor | None]]]:
        seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        writers = {1: [lambda h, m: add(h)], 2: [lambda h, m: cap(h)]}
        readers = {2: [lambda h, m: seen.append((h.clone(), None if m is None else m.clone()))]}
        with residual_hooks(lm, writers=writers, readers=readers):
            logits, _ = _decode(lm.model, 5, own_forward=own_forward)
        return logits, seen

    ours, ours_seen = run(False)
    theirs, theirs_seen = run(True)
    plain, _ = _decode(lm.model, 5, own_forward=False)
    assert not torch.equal(ours[0], plain[0])  # the writers acted
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert len(ours_seen) == len(theirs_seen) == 1 + 5  # the prefill, then every step
    for (h, m), (h2, m2) in zip(ours_seen, theirs_seen, strict=True):
        assert torch.equal(h, h2)
        assert m is not None and m2 is not None and torch.equal(m, m2)
    assert not ours_seen[0][1].all()  # the prefill's padding reached the readers
    assert ours_seen[-1][1].shape == (3, 1)  # a step's mask: its one new position per row


@pytest.mark.parametrize(
    "where",
    ["submodule", "block pre-hook", "block hook with keywords", "base model hook", "causal LM pre-hook", "global"],
)
def test_step_steps_aside_for_hooks_it_would_not_run(where):
    """A hook the step would skip sends the call to the model's forward, where the hook runs."""
    model = _model("llama")
    calls = []

    def scale(module, args, output):
        calls.append(1)
        return output * 1.5 if isinstance(output, torch.Tensor) else output

    block = model.model.layers[1]
    if where == "submodule":
        handle = block.mlp.register_forward_hook(scale)
    elif where == "block pre-hook":
        handle = block.register_forward_pre_hook(lambda module, args: calls.append(1))
    elif where == "block hook with keywords":
        handle = block.register_forward_hook(lambda m, a, k, o: calls.append(1), with_kwargs=True)
    elif where == "base model hook":
        handle = model.model.register_forward_hook(lambda m, a, o: calls.append(1))
    elif where == "causal LM pre-hook":
        handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(1) and None)
    try:
        step = LlamaDecodeStep.of(model)
        assert step is not None and not step.usable(torch.tensor([[3]]), _prefilled(model).cache)
        ours, _ = _decode(model, 3, own_forward=True)  # the forward runs, with the hook
        forward = CachedForward.of(model)
        batch = _prefilled(model)
        calls.clear()
        with torch.inference_mode():
            positions = batch.extend()
            logits = forward.logits(torch.tensor([[3], [4], [5]]), batch.mask, positions, batch.cache)
        assert calls  # the hook ran on the decode step
        assert torch.equal(logits, ours[0])
    finally:
        handle.remove()
    assert LlamaDecodeStep.of(model).usable(torch.tensor([[3]]), _prefilled(model).cache)


def test_step_applies_to_one_new_token_in_a_buffered_cache_only():
    model = _model("llama")
    step = LlamaDecodeStep.of(model)
    assert step is not None
    buffered = _prefilled(model).cache
    assert step.usable(torch.tensor([[3]]), buffered)
    assert not step.usable(torch.tensor([[3, 4]]), buffered)  # a prefill
    assert not step.usable(torch.tensor([[3]]), kv.new_cache(model, None))  # transformers' plain cache
    offloading = _prefilled(model).cache
    offloading.offloading = True  # its ``update`` would move layers between devices around each layer's own
    assert kv.buffered_layers(offloading) is None and not step.usable(torch.tensor([[3]]), offloading)
    with model_forward_steps():
        assert not step.usable(torch.tensor([[3]]), buffered)
    model.train()
    try:
        assert not step.usable(torch.tensor([[3]]), buffered)
    finally:
        model.eval()
    model.config._attn_implementation = "sdpa"
    try:
        assert not step.usable(torch.tensor([[3]]), buffered)
    finally:
        use_decode_attention(model) or setattr(model.config, "_attn_implementation", "personaxis_decode")


def test_other_architectures_have_no_step():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval()
    assert LlamaDecodeStep.of(gpt2) is None
    assert LlamaDecodeStep.of(tiny_model("gemma2").model) is None  # another block, norms and a sliding window
    torch.manual_seed(0)
    windowed = MistralForCausalLM(
        MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, sliding_window=16)
    )
    assert LlamaDecodeStep.of(windowed) is None
    dispatched = tiny_model("llama").model
    dispatched.model.layers[0].mlp._hf_hook = object()  # as accelerate's device map leaves it
    assert LlamaDecodeStep.of(dispatched) is None
    assert LlamaDecodeStep.of(tiny_model("qwen2").model) is not None


def test_engine_tokens_and_capture_are_the_same_with_the_step(tiny_lm):
    """Greedy and seeded sampling, interventions on the residual stream and a capture of the answers' block outputs,
    with rows joining a running batch: the same tokens and the same captured sums with and without the step."""
    assert_engine_runs_agree(
        tiny_lm, model_forward_steps, lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)
    )


def test_rotation_is_transformers_rotary_function_bit_for_bit():
    """The step's rotation (one ``roll``, the negation moved into ``sin``) gives the values of transformers' own
    ``apply_rotary_pos_emb`` exactly, on heads that are a strided slice of the stacked product, as in the step."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from personaxis.generation.llama_step import _Rotation

    generator = torch.Generator().manual_seed(0)
    heads = torch.randn(5, 1, 12, 64, generator=generator).transpose(1, 2)[:, :9]  # [rows, heads, 1, dim], strided
    angles = torch.randn(5, 1, 64, generator=generator) * 100
    cos, sin = angles.cos(), angles.sin()
    expected, _ = apply_rotary_pos_emb(heads, heads, cos, sin)
    assert torch.equal(_Rotation(cos, sin).apply(heads), expected)
