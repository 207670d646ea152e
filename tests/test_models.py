"""Model loading, layer discovery across architectures, the model profile, and the embedded model."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import tiny_tokenizer

from personaxis.generation import SamplingConfig, generate
from personaxis.models import ModelLoadError, build_profile, find_layers_path, load_model

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=400,
    max_position_embeddings=128,
)

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL, "model.layers"),
    "mistral": ("MistralConfig", "MistralForCausalLM", SMALL, "model.layers"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL, "model.layers"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SMALL, "head_dim": 8}, "model.layers"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**SMALL, "head_dim": 8}, "model.layers"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**SMALL, "head_dim": 8}, "model.layers"),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {**SMALL, "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1},
        "model.layers",
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=3, n_head=4, vocab_size=400, n_positions=128),
        "transformer.h",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=400,
            max_position_embeddings=128,
        ),
        "gpt_neox.layers",
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_layer_discovery_and_profile(arch):
    config_name, model_name, kwargs, expected = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, model_name)(config)
    assert find_layers_path(model) == expected
    profile = build_profile(model, tiny_tokenizer(), arch)
    assert profile.n_layers == 3 and profile.hidden_size == 32 and profile.target_layer == 1
    assert profile.supports_system_role


def test_profile_detects_thinking_switch_and_missing_system_role():
    from tiny import NO_SYSTEM

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    tok = tiny_tokenizer()
    thinking = (
        tok.chat_template + "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    )
    tok2 = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<pad>", chat_template=thinking
    )
    assert build_profile(model, tok2, "q").template_kwargs == {"enable_thinking": False}
    assert not build_profile(model, tiny_tokenizer(NO_SYSTEM), "g").supports_system_role


def test_target_layer_out_of_range_is_refused():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    with pytest.raises(IndexError, match="layer 3 is out of range.*3 layers"):
        build_profile(model, tiny_tokenizer(), "x", target_layer=3)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="nothing is downloaded"):
        load_model("nobody/no-such-model-anywhere")


def test_local_folder_loads(tmp_path):
    from tiny import tiny_model

    lm = tiny_model("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.profile.n_layers == 4 and loaded.profile.name == str(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


@pytest.mark.model
def test_embedded_model_profile(embedded_lm):
    p = embedded_lm.profile
    assert (p.name, p.n_layers, p.hidden_size, p.target_layer) == ("SmolLM2-135M-Instruct", 30, 576, 15)
    assert p.supports_system_role and p.max_context == 8192
    assert p.builtin_system_prompt is not None and "SmolLM" in p.builtin_system_prompt


@pytest.mark.model
def test_embedded_model_answers_and_plays_a_pirate(embedded_lm):
    question = "Tell me about yourself."
    config = SamplingConfig(max_new_tokens=40)
    default, pirate = generate(
        embedded_lm,
        [
            [{"role": "user", "content": question}],
            [
                {
                    "role": "system",
                    "content": "You are a pirate captain who has sailed the seven seas for forty years.",
                },
                {"role": "user", "content": question},
            ],
        ],
        config,
    )
    assert default.text and pirate.text and default.text != pirate.text
    assert any(w in pirate.text.lower() for w in ("pirate", "sea", "captain", "aye", "ship", "matey"))
