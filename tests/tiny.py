"""Tiny randomly initialised chat models for mechanics tests: no network, no downloaded weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from personaxis.decode_attention import use_decode_attention
from personaxis.kernels import use_onednn_linears
from personaxis.models import LoadedModel, build_profile

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CORPUS = [
    "You are a pirate. Tell me about yourself. Who are you? I am a helpful assistant.",
    "The quick brown fox jumps over the lazy dog while the ghost sings to the moon.",
    "What do you fear most? Explain how rainbows form. Arr, matey, the sea is my home!",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"-()[]",
]


@functools.cache
def tiny_tokenizer(template: str = CHATML) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    eos = "<|im_end|>" if template == CHATML else "<end_of_turn>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>", chat_template=template)


def _common(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


def tiny_model(kind: str = "llama", *, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(NO_SYSTEM if kind == "gemma2" else CHATML)
    vocab = len(tokenizer)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common(vocab)))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common(vocab)))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common(vocab), sliding_window=None))
    elif kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**_common(vocab), head_dim=8, sliding_window=64))
    else:
        raise ValueError(kind)
    model.to(dtype).eval().requires_grad_(False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if use_onednn_linears(model):  # as load_model does
        use_decode_attention(model)
    return LoadedModel(model=model, tokenizer=tokenizer, profile=build_profile(model, tokenizer, f"tiny-{kind}"))


def assert_engine_runs_agree(
    lm: LoadedModel,
    other_path: Callable[[], AbstractContextManager[None]],
    compare: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """Greedy and seeded sampling with an intervention and a capture of the answers' block outputs, rows joining a
    running batch: the same tokens as inside ``other_path()`` (the path a fast one replaces), and each answer's
    captured means passed to ``compare`` (an exact or a rounding comparison)."""
    from personaxis.capture import ResponseCapture
    from personaxis.generation import SamplingConfig, generate_ids
    from personaxis.interventions import Add

    prompts = [[5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13], [14, 15, 16, 17], [18], [19, 20, 21]]
    interventions = {lm.profile.target_layer: [Add(torch.linspace(-1, 1, lm.profile.hidden_size), alpha=3.0)]}
    for config in (
        SamplingConfig(max_new_tokens=10, batch_size=3),
        SamplingConfig(max_new_tokens=10, batch_size=4, temperature=0.9, top_p=0.9, seed=3),
    ):
        captures = [ResponseCapture(lm), ResponseCapture(lm)]
        ours = generate_ids(lm, prompts, config, interventions=interventions, capture=captures[0])
        with other_path():
            theirs = generate_ids(lm, prompts, config, interventions=interventions, capture=captures[1])
        assert ours == theirs
        for i in range(len(prompts)):
            n = captures[0].fed[i]
            assert n == captures[1].fed[i]
            a, b = captures[0].means_over(i, 0, n), captures[1].means_over(i, 0, n)
            assert a is not None and b is not None
            compare(a.means, b.means)
