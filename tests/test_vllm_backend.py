"""The vLLM generation backend.

The glue (prompt rendering without weights, sampling parameters, decoding, the pipeline's wiring) is tested on CPU
against a stand-in ``vllm`` module whose engine runs personaxis's own generation: the backend must then write exactly
the rollouts of the transformers backend. The real engine is tested only where vllm is installed and CUDA is present.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from tiny import tiny_model

from personaxis.backends import backend_extra, backend_name, make_backend
from personaxis.backends.vllm_backend import VLLMBackend, chat_profile
from personaxis.chat import build_conversation, render_prompt
from personaxis.generation import SamplingConfig, generate, generate_ids
from personaxis.models import load_model
from personaxis.pipeline import Pipeline
from personaxis.settings import RunSettings


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class FakeLLM:
    """Stands in for ``vllm.LLM``: greedy answers from personaxis's transformers engine, returned like vLLM's."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.lm = load_model(kwargs["model"])
        self.calls: list[list[FakeSamplingParams]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts: list[dict], params: list[FakeSamplingParams], use_tqdm: bool = True) -> list[Any]:
        self.calls.append(params)
        ids = [p["prompt_token_ids"] for p in prompts]
        config = SamplingConfig(max_new_tokens=params[0].max_tokens, batch_size=32)
        new = generate_ids(self.lm, ids, config, stop_ids=params[0].stop_token_ids)
        stops = set(params[0].stop_token_ids)
        return [
            types.SimpleNamespace(
                outputs=[
                    types.SimpleNamespace(
                        token_ids=tokens, finish_reason="stop" if tokens and tokens[-1] in stops else "length"
                    )
                ]
            )
            for tokens in new
        ]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def test_chat_profile_needs_no_weights_and_renders_like_the_loaded_model(tiny_model_dir):
    tokenizer, profile = chat_profile(str(tiny_model_dir), name=str(tiny_model_dir))
    lm = load_model(str(tiny_model_dir))
    assert profile == lm.profile
    conversation = build_conversation("You are a pirate.", "Who are you?")
    assert render_prompt(tokenizer, conversation, profile) == render_prompt(lm.tokenizer, conversation, lm.profile)


def test_backend_choice_is_recorded_only_when_not_the_default():
    assert backend_extra("transformers") == {}
    assert backend_extra("vllm") == {"backend": "vllm"}
    assert backend_name(RunSettings()) == "transformers"
    with pytest.raises(ValueError, match="unknown generation backend"):
        backend_extra("tgi")
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_backend(RunSettings(extra={"backend": "tgi"}), lambda: None)


def test_core_does_not_import_vllm():
    import subprocess

    code = (
        "import sys, personaxis.pipeline, personaxis.backends, personaxis.backends.vllm_backend, "
        "personaxis.distributed, personaxis.cli; assert 'vllm' not in sys.modules and 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generations_match_the_transformers_backend(tiny_model_dir, fake_vllm):
    lm = load_model(str(tiny_model_dir))
    conversations = [
        build_conversation(s, q)
        for s in ("You are a pirate.", "", "You are a ghost.")
        for q in ("Who are you?", "What do you fear most?")
    ]
    config = SamplingConfig(max_new_tokens=8, batch_size=32)
    backend = VLLMBackend(str(tiny_model_dir), max_model_len=4096)
    assert backend.generate(conversations, config) == generate(lm, conversations, config)
    engine = FakeLLM.instances[-1]
    assert engine.kwargs["max_model_len"] == 512  # capped at the model's context
    assert engine.kwargs["tensor_parallel_size"] >= 1
    params = engine.calls[-1][0]
    assert params.max_tokens == 8 and params.temperature == 0.0 and params.seed is None
    assert params.stop_token_ids and params.n == 1
    sampled = backend.sampling_params(SamplingConfig(temperature=0.7, seed=3), 5, [1])
    assert sampled.temperature == 0.7 and isinstance(sampled.seed, int)
    backend.close()
    assert backend._llm is None


def test_pipeline_with_the_vllm_backend_writes_the_transformers_rollouts(tmp_path, tiny_model_dir, fake_vllm):
    base = dict(model=str(tiny_model_dir), judge="none", n_traits=1, max_new_tokens=6, n_questions=3, n_roles=4)
    reference = tmp_path / "transformers"
    Pipeline(reference, RunSettings.from_preset("tiny", **base), show_progress=False).run(["generate"])
    out = tmp_path / "vllm"
    settings = RunSettings.from_preset("tiny", **base, extra=backend_extra("vllm"))
    pipeline = Pipeline(out, settings, show_progress=False)
    done = pipeline.run(["generate", "extract"])
    assert done["generate"] == done["extract"] == len(pipeline.units)
    assert len(FakeLLM.instances) == 1 and pipeline._backend is None  # one engine, released before extraction
    assert json.loads((out / "manifest.json").read_text())["settings"]["extra"] == {"backend": "vllm"}
    files = sorted(p.relative_to(reference) for p in (reference / "rollouts").rglob("*.json"))
    assert files == sorted(p.relative_to(out) for p in (out / "rollouts").rglob("*.json"))
    for rel in files:
        assert (reference / rel).read_bytes() == (out / rel).read_bytes()


def _real_vllm_skip_reason() -> str:
    import torch

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'personaxis[vllm]' on a machine with a CUDA GPU)"
    if not torch.cuda.is_available():
        return "vllm is installed but no CUDA GPU is visible: the vLLM engine runs on GPUs only"
    return ""


SKIP_REAL_VLLM = _real_vllm_skip_reason()


@pytest.mark.skipif(bool(SKIP_REAL_VLLM), reason=SKIP_REAL_VLLM or "runs")
def test_real_vllm_engine_on_the_embedded_model():
    from personaxis.backends import model_source

    source = model_source("embedded")
    lm = load_model(source, device="cuda", dtype="float32")
    conversations = [
        build_conversation(s, q)
        for s in ("You are a pirate.", "")
        for q in ("Tell me about yourself.", "What do you fear most?", "Explain how rainbows form.")
    ]
    config = SamplingConfig(max_new_tokens=24, batch_size=8)
    backend = VLLMBackend(
        source, dtype="float32", tensor_parallel_size=1, gpu_memory_utilization=0.3, max_model_len=1024
    )
    try:
        got = backend.generate(conversations, config)
    finally:
        backend.close()
    want = generate(lm, conversations, config)
    assert len(got) == len(conversations)
    for g, w in zip(got, want, strict=True):
        assert g.prompt_tokens == w.prompt_tokens  # the same rendered prompt
        assert 0 < g.new_tokens <= 24 and g.text
    agree = sum(g.text[:20] == w.text[:20] for g, w in zip(got, want, strict=True))
    assert agree >= len(conversations) // 2, [(g.text, w.text) for g, w in zip(got, want, strict=True)]
