"""`personaxis import --kind reference-run`: the reference pipeline's activations/, scores/ and vectors/ into a run
directory on which vectors, axis, space and calibrate run (a small output folder of our own, same layout)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personaxis.cli import app
from personaxis.io.tensor_files import load_axis
from personaxis.store import load_tensors

N_LAYERS, HIDDEN, PROMPTS, QUESTIONS = 3, 8, 5, 12
# Score-3 rollouts per role (of 60; the rest score 2): >= 50 keeps the role under the reference's recipe.
FULLY = {"sailor": 60, "oracle": 52, "clerk": 40}


class NotATensor:
    """A pickled object of this class must never be unpickled by an import."""


def _key(k: int, j: int) -> str:
    return f"pos_p{k}_q{j}"


def write_reference_outputs(root: Path, *, with_activations: bool = True) -> dict[str, torch.Tensor]:
    """activations/*.pt, scores/*.json and vectors/*.pt as the reference pipeline writes them; returns the vectors."""
    gen = torch.Generator().manual_seed(0)
    (root / "vectors").mkdir(parents=True)
    if with_activations:
        (root / "activations").mkdir()
        (root / "scores").mkdir()
    vectors = {}
    for role in [*FULLY, "nomad", "default"]:
        shift = torch.randn(N_LAYERS, HIDDEN, generator=gen)
        acts = {
            _key(k, j): shift + 0.1 * torch.randn(N_LAYERS, HIDDEN, generator=gen)
            for k in range(PROMPTS)
            for j in range(QUESTIONS)
        }
        keys = list(acts)
        scores = {key: 3 if i < FULLY.get(role, 0) else 2 for i, key in enumerate(keys)}
        if role == "default":
            vectors[role] = torch.stack(list(acts.values())).mean(0)
            payload = {"vector": vectors[role], "type": "mean", "role": role}
        elif role in FULLY and FULLY[role] >= 50:
            vectors[role] = torch.stack([acts[k] for k in keys if scores[k] == 3]).mean(0)
            payload = {"vector": vectors[role], "type": "pos_3", "role": role}
        else:
            payload = None
        if payload is not None:
            torch.save(payload, root / "vectors" / f"{role}.pt")
        if with_activations:
            torch.save(acts, root / "activations" / f"{role}.pt")
            if role in FULLY:  # nomad has activations but no scores: the reference's vector step skips it
                (root / "scores" / f"{role}.json").write_text(json.dumps(scores))
    return vectors


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_import_reference_run_then_vectors_axis_space_calibrate(tmp_path):
    reference = write_reference_outputs(tmp_path / "outputs")
    run = tmp_path / "run"
    result = _cli(
        "import",
        "--from",
        str(tmp_path / "outputs"),
        "--kind",
        "reference-run",
        "--out",
        str(run),
        "--model",
        "some/model",
    )
    assert result.exit_code == 0, result.output
    assert "3 roles" in result.stdout and "left out 1 role(s) without scores" in result.stdout
    for stage in ("vectors", "axis", "space"):
        result = _cli(stage, "--out", str(run), "--quiet")
        assert result.exit_code == 0, result.output
    # Our vectors from the imported activations and scores are the reference's vectors/*.pt.
    for role in ("sailor", "oracle"):
        ours = load_tensors(run / "vectors" / "roles" / f"{role}.safetensors")["fully"]
        torch.testing.assert_close(ours, reference[role], atol=1e-6, rtol=1e-6)
    default = load_tensors(run / "vectors" / "default.safetensors")["vector"]
    torch.testing.assert_close(default, reference["default"], atol=1e-6, rtol=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(r["name"] for r in summary["roles"]) == ["oracle", "sailor"]
    assert [r["name"] for r in summary["dropped_roles"]] == ["clerk"] and summary["vector_recipe"] == "reference"
    axis = load_axis(run / "axis.safetensors")
    torch.testing.assert_close(
        axis.vectors, reference["default"] - (reference["sailor"] + reference["oracle"]) / 2, atol=1e-6, rtol=1e-6
    )
    assert axis.residual_norms is None and axis.metadata["residual_norms"] == "not measured"
    assert axis.model == "some/model"
    result = _cli("calibrate", "--run", str(run))
    assert result.exit_code == 0, result.output
    assert (run / "capping.safetensors").is_file()


def test_import_vectors_only_gives_axis_and_space(tmp_path):
    reference = write_reference_outputs(tmp_path / "outputs", with_activations=False)
    run = tmp_path / "run"
    assert (
        _cli("import", "--from", str(tmp_path / "outputs"), "--kind", "reference-run", "--out", str(run)).exit_code == 0
    )
    for stage in ("vectors", "axis", "space"):
        result = _cli(stage, "--out", str(run), "--quiet")
        assert result.exit_code == 0, result.output
    axis = load_axis(run / "axis.safetensors")
    torch.testing.assert_close(
        axis.vectors, reference["default"] - (reference["sailor"] + reference["oracle"]) / 2, atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        ("unsafe", "refused"),
        ("badkey", "is not of the form"),
        ("badscore", "is not a 0-3 score"),
        ("nodefault", "no default.pt"),
        ("empty", "no activations/\\*.pt or vectors/\\*.pt"),
    ],
)
def test_bad_reference_outputs_are_refused(tmp_path, damage, message):
    root = tmp_path / "outputs"
    write_reference_outputs(root)
    if damage == "unsafe":
        torch.save({_key(0, 0): NotATensor()}, root / "activations" / "sailor.pt")
    elif damage == "badkey":
        torch.save({"sailor-0": torch.zeros(N_LAYERS, HIDDEN)}, root / "activations" / "sailor.pt")
    elif damage == "badscore":
        (root / "scores" / "sailor.json").write_text(json.dumps({_key(0, 0): 7}))
    elif damage == "nodefault":
        (root / "activations" / "default.pt").unlink()
    elif damage == "empty":
        root = tmp_path / "nothing"
        root.mkdir()
    result = _cli("import", "--from", str(root), "--kind", "reference-run", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output), result.output
