"""Every model-loading command takes --device, --dtype, --allow-download and --trust-remote-code (one shared
definition); a model the user loaded can be wrapped; `steer --raw` and `export --raw` add the same vector."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model
from typer.testing import CliRunner

from personaxis import models
from personaxis.axis import Axis
from personaxis.cli import app
from personaxis.io.tensor_files import load_axis, save_axis
from personaxis.kernels import OneDNNLinear, onednn_available
from personaxis.models import ModelLoadError, ModelPlacement, load_model, resolve_device, resolve_dtype, wrap_model

runner = CliRunner()
BF16 = ["--device", "cpu", "--dtype", "bfloat16"]
MODEL_COMMANDS = [
    ["steer"],
    ["monitor"],
    ["chat"],
    ["serve"],
    ["run"],
    ["generate"],
    ["extract"],
    ["import"],
    ["eval", "steering"],
    ["eval", "drift"],
    ["eval", "jailbreak"],
    ["eval", "capability"],
    ["eval", "capping"],
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    lm = tiny_model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    save_axis(
        Axis(torch.randn(4, 32, generator=g), model="tiny", residual_norms=torch.full((4,), 3.0)),
        root / "axis.safetensors",
    )
    transcript = {
        "conversation": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am a pirate."},
        ]
    }
    (root / "t.json").write_text(json.dumps(transcript))
    return root


@pytest.fixture
def loads(monkeypatch):
    """Record the device and dtype of every model a command loads."""
    seen: list[tuple[str, torch.dtype]] = []
    original = ModelPlacement.load

    def load(self, *args, **kwargs):
        lm = original(self, *args, **kwargs)
        seen.append((lm.device.type, next(lm.model.parameters()).dtype))
        return lm

    monkeypatch.setattr(ModelPlacement, "load", load)
    return seen


def _ok(args):
    result = runner.invoke(app, args, input="Hello there\n/quit\n")
    assert result.exit_code == 0, result.output
    return result


def test_every_model_loading_command_has_the_shared_options():
    for command in MODEL_COMMANDS:
        result = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        for flag in ("--device", "--dtype", "--allow-download", "--trust-remote-code"):
            assert flag in result.output, (command, flag)


def test_defaults_and_checks():
    assert resolve_device(None).type == models.default_device()
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "bad, message", [(["--device", "tpu"], "unknown device"), (["--dtype", "int8"], "unknown dtype")]
)
def test_bad_device_or_dtype_is_one_line_error(tiny_folder, bad, message):
    for args in (
        ["steer", "--axis", str(tiny_folder / "axis.safetensors"), "--alpha", "0.1", "Hi"],
        ["monitor", "--axis", str(tiny_folder / "axis.safetensors"), str(tiny_folder / "t.json")],
    ):
        result = runner.invoke(app, [*args, "--model", str(tiny_folder / "model"), *bad])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output


def test_steer_monitor_chat_serve_import_in_bfloat16_on_cpu(tiny_folder, loads, tmp_path, monkeypatch):
    axis, model = str(tiny_folder / "axis.safetensors"), str(tiny_folder / "model")
    _ok(["steer", "--axis", axis, "--model", model, "--alpha", "0.5", "-n", "3", "Who are you?", *BF16])
    _ok(
        [
            "monitor",
            "--axis",
            axis,
            "--model",
            model,
            "--out",
            str(tmp_path / "mon"),
            str(tiny_folder / "t.json"),
            *BF16,
        ]
    )
    _ok(["chat", "--axis", axis, "--model", model, "-n", "3", "--alpha", "0.2", "--raw", *BF16])
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda web, **kwargs: served.append(web))
    _ok(["serve", "--run", str(tmp_path), "--axis", axis, "--model", model, "--raw", "--alpha", "0.1", *BF16])
    assert served and served[0].state.px.service.raw_alpha is True
    reference = tmp_path / "ref.pt"
    _ok(["export", "--axis", axis, "--format", "reference", "--out", str(reference)])
    imported = tmp_path / "imported.safetensors"
    _ok(
        [
            "import",
            "--from",
            str(reference),
            "--kind",
            "axis",
            "--out",
            str(imported),
            "--model",
            model,
            "--measure-norms",
            *BF16,
        ]
    )
    norms = load_axis(imported).residual_norms
    assert norms is not None and norms.shape == (4,) and bool((norms > 0).all())
    assert loads == [("cpu", torch.bfloat16)] * 5


@pytest.mark.slow
@pytest.mark.ci_sample
def test_run_stages_and_eval_in_bfloat16_on_cpu(tiny_folder, loads, tmp_path):
    model, out = str(tiny_folder / "model"), str(tmp_path / "run")
    _ok(["run", "--preset", "tiny", "--model", model, "--out", out, "--judge", "none", "-q", *BF16])
    (tmp_path / "run" / "activations").rename(tmp_path / "old-activations")
    _ok(["extract", "--out", out, "-q", *BF16])
    _ok(
        [
            "eval",
            "steering",
            "--run",
            out,
            "--model",
            model,
            "--alphas",
            "0",
            "--roles",
            "1",
            "--questions",
            "1",
            "--max-new-tokens",
            "2",
            "--out",
            str(tmp_path / "ev"),
            "-q",
            *BF16,
        ]
    )
    assert loads == [("cpu", torch.bfloat16)] * 3


def test_steer_raw_and_export_raw_add_the_same_vector(tiny_folder, tmp_path, monkeypatch):
    from personaxis import steering
    from personaxis.generation import Generation
    from personaxis.interop import read_gguf_control_vector

    added = []

    def fake_generate(lm, conversations, config, *, interventions=None, **kwargs):
        for layer, ops in (interventions or {}).items():
            added.extend((layer, op.alpha * op.vector) for op in ops)
        return [Generation("x", 1, 1, True) for _ in conversations]

    monkeypatch.setattr(steering, "generate", fake_generate)
    axis = str(tiny_folder / "axis.safetensors")
    _ok(
        [
            "steer",
            "--axis",
            axis,
            "--model",
            str(tiny_folder / "model"),
            "--raw",
            "--alpha",
            "-2.0",
            "--layer",
            "2",
            "Hi",
        ]
    )
    out = tmp_path / "raw.gguf"
    _ok(["export", "--axis", axis, "--format", "gguf", "--raw", "--scale", "-2.0", "--layer", "2", "--out", str(out)])
    vectors, _ = read_gguf_control_vector(out)
    assert [layer for layer, _ in added] == [2]
    assert torch.equal(added[0][1], vectors[2])
    assert torch.equal(vectors[2], -2.0 * load_axis(axis).vectors[2])  # the stored row, not the unit axis


def test_wrap_a_model_the_user_loaded():
    from transformers import AutoModelForCausalLM

    from personaxis.activations import extract_turn_means
    from personaxis.generation import SamplingConfig, generate

    source = tiny_model("llama")
    from personaxis.kernels import restore_linears

    restore_linears(source.model)
    model = AutoModelForCausalLM.from_config(source.model.config)
    model.load_state_dict(source.model.state_dict())
    lm = wrap_model(model, source.tokenizer, name="mine")
    assert lm.model is model and lm.profile.name == "mine" and not model.training
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())  # the user's layers are left as they are
    answer = generate(lm, [[{"role": "user", "content": "Who are you?"}]], SamplingConfig(max_new_tokens=3))
    acts = extract_turn_means(lm, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]])
    assert answer[0].new_tokens >= 1 and acts[0].means.shape == (1, 4, 32)
    same = models.LoadedModel.from_pretrained_objects(model, source.tokenizer)
    assert same.model is model and same.profile.n_layers == 4


def test_fast_cpu_linears_is_a_visible_choice(tiny_folder):
    plain = load_model(tiny_folder / "model", device="cpu", fast_cpu_linears=False)
    assert not any(isinstance(m, OneDNNLinear) for m in plain.model.modules())
    if onednn_available():
        fast = load_model(tiny_folder / "model", device="cpu", fast_cpu_linears=True)
        assert any(isinstance(m, OneDNNLinear) for m in fast.model.modules())
    half = load_model(tiny_folder / "model", device="cpu", dtype="bfloat16")
    assert not any(isinstance(m, OneDNNLinear) for m in half.model.modules())  # float32 only


def test_load_error_names_a_flag_that_exists():
    with pytest.raises(ModelLoadError, match="--allow-download") as caught:
        load_model("some-org/not-a-cached-model")
    assert "\n" not in str(caught.value)
    result = runner.invoke(app, ["steer", "--help"], terminal_width=200)
    assert "--allow-download" in result.output
