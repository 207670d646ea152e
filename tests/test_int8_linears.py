"""int8 linear layers for rollouts: close to float32, opt-in, undone after use, recorded, and never captured from."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model
from torch import nn
from typer.testing import CliRunner

from personaxis import int8_linears as int8
from personaxis.backends import TransformersBackend, make_backend
from personaxis.chat import build_conversation
from personaxis.generation import SamplingConfig, generate
from personaxis.int8_linears import Int8Linear, int8_linear, int8_linears, quantize_weight, rollout_weights
from personaxis.kernels import OneDNNLinear, use_onednn_linears
from personaxis.settings import RunSettings

pytestmark = pytest.mark.skipif(not int8.int8_available(), reason="this PyTorch build has no int8 CPU engine")


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per row: the largest error over the row's largest magnitude."""
    return (got - expected).abs().amax(-1) / expected.abs().amax(-1)


@pytest.fixture(autouse=True)
def _fbgemm():
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = int8.int8_engine()
    yield
    torch.backends.quantized.engine = before


@pytest.mark.parametrize("bias", [True, False])
def test_int8_products_are_within_a_few_percent_of_float32(bias):
    torch.manual_seed(0)
    layer = nn.Linear(256, 96, bias=bias)
    x = torch.randn(16, 256)
    got = int8_linear(x, quantize_weight(layer.weight), layer.bias)
    expected = nn.functional.linear(x, layer.weight, layer.bias)
    assert got.shape == expected.shape and got.dtype is torch.float32
    error = _relative_error(got, expected)
    assert error.max() < 0.05 and error.mean() < 0.02
    assert (got - expected).abs().max() > 0  # it is int8 arithmetic, not float32


def test_each_row_gets_the_whole_int8_range():
    """A row of outliers (a prompt's first token) leaves the other rows as accurate as alone."""
    torch.manual_seed(1)
    layer = nn.Linear(128, 64, bias=False)
    packed = quantize_weight(layer.weight)
    x = torch.randn(8, 128)
    x[0] *= 1000
    expected = nn.functional.linear(x, layer.weight)
    together = _relative_error(int8_linear(x, packed), expected)[1:]
    alone = torch.stack(
        [
            _relative_error(int8_linear(row[None], packed), e[None])[0]
            for row, e in zip(x[1:], expected[1:], strict=True)
        ]
    )
    assert together.max() < 0.05
    torch.testing.assert_close(together, alone, rtol=0.5, atol=0.01)


def test_the_block_swaps_linears_and_gives_them_back(monkeypatch):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16, bias=False), nn.Linear(16, 8).double())
    use_onednn_linears(model[2], pack=True)
    classes = [type(m) for m in model]
    x = torch.randn(5, 32)
    with torch.inference_mode():
        before = model[:3](x)
    quantized = [0]
    real = int8.quantize_weight

    def counting(weight):
        quantized[0] += 1
        return real(weight)

    monkeypatch.setattr(int8, "quantize_weight", counting)
    for _ in range(2):
        with int8_linears(model) as swapped, torch.inference_mode():
            assert swapped == 2  # the float64 layer stays as it is
            assert type(model[0]) is Int8Linear and type(model[2]) is Int8Linear and type(model[3]) is nn.Linear
            during = model[:3](x)
    assert quantized[0] == 2  # the int8 copies are made once and kept
    assert [type(m) for m in model] == classes and type(model[2]) is OneDNNLinear
    with torch.inference_mode():
        after = model[:3](x)
    assert torch.equal(before, after)
    assert not torch.equal(before, during) and _relative_error(during, before).max() < 0.05


def test_int8_layers_follow_weight_changes_and_leave_gradients_to_float32():
    torch.manual_seed(3)
    layer = nn.Linear(64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    with int8_linears(layer):
        out = layer(x)  # autograd: float32, exactly
        assert torch.equal(out, nn.functional.linear(x, layer.weight, layer.bias))
        out.sum().backward()
        with torch.no_grad():
            first = layer(x)
            layer.weight.mul_(-1)
            second = layer(x)
        expected = nn.functional.linear(x.detach(), layer.weight, layer.bias)
    assert _relative_error(second, expected).max() < 0.05
    assert not torch.allclose(first, second)


def test_tiny_model_generates_with_int8_weights():
    lm = tiny_model("llama")
    conversations = [build_conversation("You are a pirate.", q) for q in ("Who are you?", "What do you fear most?")]
    config = SamplingConfig(max_new_tokens=6)
    plain = generate(lm, conversations, config)
    backend = TransformersBackend(lambda: lm, weights="int8")
    assert not backend.captures
    answers = backend.generate(conversations, config)
    assert len(answers) == 2 and all(0 < a.new_tokens <= 6 for a in answers)
    assert all(type(m) is not Int8Linear for m in lm.model.modules())
    assert [a.text for a in generate(lm, conversations, config)] == [a.text for a in plain]


def test_int8_weights_need_a_float32_cpu_model():
    lm = tiny_model("llama", dtype=torch.float64)
    backend = TransformersBackend(lambda: lm, weights="int8")
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        backend.generate([build_conversation(None, "Hi")], SamplingConfig(max_new_tokens=2))


def test_rollout_weights_settings_and_backends():
    assert rollout_weights(RunSettings.from_preset("tiny")) == "float32"
    settings = RunSettings.from_preset("tiny", extra=int8.rollout_weights_extra("int8"))
    assert rollout_weights(settings) == "int8"
    assert int8.rollout_weights_extra("float32") == {}
    backend = make_backend(settings, lambda: tiny_model("llama"))
    assert backend.weights == "int8" and not backend.captures
    with pytest.raises(ValueError, match="unknown rollout weights"):
        rollout_weights(RunSettings.from_preset("tiny", extra={"rollout_weights": "int4"}))
    with pytest.raises(ValueError, match="vLLM"):
        make_backend(
            RunSettings.from_preset("tiny", extra={"backend": "vllm", "rollout_weights": "int8"}), lambda: None
        )


def test_a_run_with_int8_rollouts_extracts_in_float32(tmp_path):
    """The rollouts come from int8 weights; the activations are a float32 teacher-forced pass over them, and the
    manifest says so."""
    from personaxis.activations import extract_turn_means
    from personaxis.pipeline import Pipeline

    lm = tiny_model("llama")
    extra = {**int8.rollout_weights_extra("int8"), "extract": "teacher-forced"}
    settings = RunSettings.from_preset("tiny", judge="none", n_traits=0, max_new_tokens=5, n_roles=3, extra=extra)
    pipeline = Pipeline(tmp_path / "run", settings, lm=lm, show_progress=False)
    done = pipeline.run(["generate", "extract"])
    assert done["extract"] == len(pipeline.units)  # nothing was captured while generating
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["settings"]["extra"] == {"rollout_weights": "int8", "extract": "teacher-forced"}
    unit = pipeline.units[0]
    ids, means, _ = pipeline.read_activations(unit)
    record = json.loads(pipeline.rollout_path(unit).read_text())
    conversations = [
        build_conversation(record["system_prompt"], r["question"]) + [{"role": "assistant", "content": r["answer"]}]
        for r in record["rollouts"]
    ]
    expected = extract_turn_means(lm, conversations)
    assert ids == [r["id"] for r in record["rollouts"]]
    for got, want in zip(means, expected, strict=True):
        torch.testing.assert_close(got, want.means[-1], rtol=1e-5, atol=1e-5)


def test_cli_rollout_weights(tmp_path):
    from personaxis.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["run", "--help"], terminal_width=200).output
    assert "--rollout-weights" in help_text and "int8" in help_text
    bad = runner.invoke(app, ["run", "--out", str(tmp_path / "r"), "--rollout-weights", "int4"])
    assert bad.exit_code != 0 and "unknown rollout weights" in bad.output
