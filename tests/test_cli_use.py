"""``personaxis steer``, ``monitor`` and ``chat`` through the CLI, with a random axis on the embedded model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from personaxis.axis import Axis
from personaxis.cli import app
from personaxis.io.tensor_files import load_axis, save_axis, save_capping

runner = CliRunner()
N_LAYERS, HIDDEN = 30, 576  # the embedded SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def axis_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("axis") / "axis.safetensors"
    axis = Axis(
        torch.randn(N_LAYERS, HIDDEN, generator=g),
        model="SmolLM2-135M-Instruct",
        residual_norms=torch.linspace(40, 120, N_LAYERS),
    )
    save_axis(axis, path)
    return path


@pytest.fixture(scope="module")
def capping_file(axis_file, tmp_path_factory):
    from personaxis.capping import Cap, CappingConfig, CapVector, Experiment

    axis = load_axis(axis_file)
    thresholds = torch.linspace(-2.0, 2.0, N_LAYERS).unsqueeze(0)
    config = CappingConfig(
        {f"axis_{layer}": CapVector(layer, axis.unit(layer)) for layer in (14, 15)},
        [
            Experiment(
                "layers_14:16-p0.25", tuple(Cap(f"axis_{layer}", float(thresholds[0, layer])) for layer in (14, 15))
            )
        ],
        percentiles=[25.0],
        thresholds=thresholds,
        model="SmolLM2-135M-Instruct",
    )
    return save_capping(config, tmp_path_factory.mktemp("capping") / "capping.safetensors")


def _transcript(n_turns: int, domain: str) -> dict:
    conversation = []
    for i in range(n_turns):
        conversation += [
            {"role": "user", "content": f"Tell me something about topic {i}."},
            {"role": "assistant", "content": f"Topic {i} is interesting because it has many sides."},
        ]
    return {"model": "someone", "domain": domain, "turns": n_turns, "conversation": conversation}


def test_help_texts_teach_with_an_example():
    for command in ("steer", "monitor", "chat"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Example" in result.output and "personaxis " + command in result.output


@pytest.mark.model
def test_steer_alpha_zero_and_several_layers(axis_file, tmp_path):
    out = tmp_path / "zero.json"
    result = runner.invoke(
        app,
        [
            "steer",
            "--axis",
            str(axis_file),
            "--alpha",
            "0",
            "-n",
            "6",
            "--json",
            str(out),
            "Who are you?",
            "What is your name?",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "unsteered" in result.stdout and "steered" in result.stdout
    data = json.loads(out.read_text())
    assert data["layers"] == [15] and len(data["answers"]) == 2
    assert all(a["steered"] == a["unsteered"] and a["unsteered"] for a in data["answers"])
    out2 = tmp_path / "two.json"
    result = runner.invoke(
        app,
        [
            "steer",
            "--axis",
            str(axis_file),
            "--alpha",
            "-0.5",
            "--layer",
            "3",
            "--layer",
            "20",
            "-n",
            "4",
            "--json",
            str(out2),
            "Who are you?",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out2.read_text())
    assert data["layers"] == [3, 20] and data["alpha"] == -0.5 and "L3" in data["description"]


@pytest.mark.model
def test_monitor_files_and_folders(axis_file, capping_file, tmp_path):
    folder = tmp_path / "transcripts"
    folder.mkdir()
    (folder / "coding.json").write_text(json.dumps(_transcript(2, "coding")))
    (folder / "therapy.json").write_text(json.dumps(_transcript(3, "therapy")))
    extra = tmp_path / "philosophy.json"
    extra.write_text(json.dumps(_transcript(1, "philosophy")))
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "monitor",
            "--axis",
            str(axis_file),
            "--capping",
            str(capping_file),
            "--out",
            str(out),
            str(folder),
            str(extra),
        ],
    )
    assert result.exit_code == 0, result.output
    table = json.loads((out / "projections.json").read_text())
    assert [t["domain"] for t in table["transcripts"]] == ["coding", "therapy", "philosophy"]
    assert len(table["rows"]) == 6 and table["plotted_layer"] == 15
    assert table["floor"] == pytest.approx(float(torch.linspace(-2.0, 2.0, N_LAYERS)[15]))
    assert all(row["truncated"] is False for row in table["rows"])
    assert (out / "projections.csv").read_text().startswith("transcript,turn,message_index,layer_15,truncated")
    assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["monitor", "--axis", str(axis_file), "--all-layers", "--out", str(out), str(extra)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "projections.json").read_text())["layers"] == list(range(N_LAYERS))


@pytest.mark.model
def test_chat_with_piped_input(axis_file, capping_file, tmp_path):
    saved = tmp_path / "chat.json"
    lines = ["Hello!", "/unknown", f"/save {saved}", "/reset", "Who are you?", "/quit", "never read"]
    result = runner.invoke(
        app,
        [
            "chat",
            "--axis",
            str(axis_file),
            "--capping",
            str(capping_file),
            "--cap",
            "layers_14:16-p0.25",
            "--alpha",
            "0.1",
            "-n",
            "12",
            "-t",
            "0",
        ],
        input="\n".join(lines) + "\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("projection") == 2 and "unknown command" in result.stdout
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["conversation"]] == ["user", "assistant"]
    assert len(data["projections"]) == 1 and data["cap"] == "layers_14:16-p0.25" and data["alpha"] == 0.1
    # A saved chat is a transcript that monitor reads back.
    again = runner.invoke(app, ["monitor", "--axis", str(axis_file), "--out", str(tmp_path / "m"), str(saved)])
    assert again.exit_code == 0, again.output


def test_bad_inputs_give_clear_errors(axis_file, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = runner.invoke(app, ["monitor", "--axis", str(axis_file), str(broken)])
    assert result.exit_code == 2 and "broken.json: malformed JSON" in result.stderr
    no_assistant = tmp_path / "lonely.json"
    no_assistant.write_text(json.dumps({"conversation": [{"role": "user", "content": "Hi"}]}))
    result = runner.invoke(app, ["monitor", "--axis", str(axis_file), str(no_assistant)])
    assert result.exit_code == 2 and "lonely.json: the conversation has no assistant turn" in result.stderr
    result = runner.invoke(app, ["steer", "--axis", str(tmp_path / "nowhere"), "--alpha", "0.1", "Hi"])
    assert result.exit_code == 2 and "no such axis file or run directory" in result.stderr
    result = runner.invoke(app, ["monitor", "--axis", str(tmp_path), str(broken)])
    assert result.exit_code == 2 and "broken.json" in result.stderr


@pytest.mark.model
def test_axis_of_another_model_is_refused(tmp_path):
    small = tmp_path / "small.safetensors"
    save_axis(Axis(torch.randn(4, 32), residual_norms=torch.ones(4)), small)
    result = runner.invoke(app, ["steer", "--axis", str(small), "--alpha", "0.1", "Hi"])
    assert result.exit_code == 2 and "hidden size 32" in result.stderr
