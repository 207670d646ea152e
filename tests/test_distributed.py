"""The Ray path on CPU: a local Ray cluster (2 CPUs) writes the same run as a plain local run, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from personaxis.io.tensor_files import load_axis
from personaxis.pipeline import STAGES, Pipeline
from personaxis.settings import RunSettings
from personaxis.store import load_tensors

ray = pytest.importorskip("ray", reason="the Ray path needs ray: pip install 'personaxis[ray]'")

pytestmark = [pytest.mark.slow, pytest.mark.ci_sample]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def executor():
    from personaxis.distributed import RayExecutor

    ex = RayExecutor("local", num_cpus=2)
    yield ex
    ex.shutdown()


def _settings(model: Path) -> RunSettings:
    # batch_size 4 → chunks of 2 units (8 conversations / 3 questions): 12 units make 6 chunks over 2 workers
    return RunSettings.from_preset(
        "tiny",
        model=str(model),
        judge="none",
        n_traits=1,
        max_new_tokens=6,
        n_questions=3,
        n_roles=5,
        extra={"batch_size": 4},
    )


def _files(root: Path, folder: str, suffix: str) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / folder).rglob(f"*{suffix}"))


def test_ray_run_equals_local_run_and_resumes(tmp_path, tiny_model_dir, executor):
    settings = _settings(tiny_model_dir)
    local, distributed = tmp_path / "local", tmp_path / "ray"
    Pipeline(local, settings, show_progress=False).run()
    pipeline = Pipeline(distributed, settings, show_progress=False, executor=executor)
    done = pipeline.run()
    assert done["generate"] == len(pipeline.units) == 12 and done["extract"] == 0  # captured while generating
    assert pipeline._lm is None, "the driver must not load the model: the workers do"
    assert len(executor._workers) == 2

    assert json.loads((distributed / "manifest.json").read_text())["settings"] == settings.to_manifest()
    rollouts = _files(local, "rollouts", ".json")
    assert rollouts == _files(distributed, "rollouts", ".json") and len(rollouts) == 12
    for rel in rollouts:
        assert (local / rel).read_bytes() == (distributed / rel).read_bytes(), rel
    activations = _files(local, "activations", ".safetensors")
    assert activations == _files(distributed, "activations", ".safetensors")
    for rel in activations:
        a, b = load_tensors(local / rel), load_tensors(distributed / rel)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        load_axis(distributed / "axis.safetensors").vectors,
        load_axis(local / "axis.safetensors").vectors,
        rtol=0,
        atol=1e-5,
    )

    # resuming: remove some units' files, run again on Ray: only those are redone, nothing else is touched
    removed = [distributed / rollouts[0], distributed / activations[5]]
    for path in removed:
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (distributed / "rollouts").rglob("*.json") if p.is_file()}
    again = Pipeline(distributed, settings, show_progress=False, executor=executor).run(["generate", "extract"])
    assert again == {**{stage: 0 for stage in STAGES}, "generate": 1, "extract": 1}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    ids = [[r["id"] for r in json.loads((root / rollouts[0]).read_text())["rollouts"]] for root in (local, distributed)]
    assert ids[0] == ids[1]
    assert load_tensors(removed[1]).keys() == load_tensors(local / activations[5]).keys()
    # and a Ray-started run finishes locally with nothing left to do
    assert Pipeline(distributed, settings, show_progress=False).run() == {stage: 0 for stage in STAGES}


def test_ray_worker_errors_reach_the_driver(tmp_path, executor):
    from personaxis.models import ModelLoadError

    settings = RunSettings.from_preset("tiny", model=str(tmp_path / "no-such-model"), judge="none", n_traits=0)
    with pytest.raises(ModelLoadError, match="model path does not exist"):
        Pipeline(tmp_path / "run", settings, show_progress=False, executor=executor).run(["generate"])


def test_executor_refuses_other_stages(tmp_path, tiny_model_dir, executor):
    pipeline = Pipeline(tmp_path / "run", _settings(tiny_model_dir), show_progress=False)
    with pytest.raises(ValueError, match="does not run on Ray"):
        executor.run_chunks(pipeline, "judge", [pipeline.units[:1]], lambda n: None)


@pytest.mark.slow
def test_cli_run_on_local_ray_equals_plain_cli_run(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    if ray.is_initialized():
        ray.shutdown()
    args = [
        "--model",
        str(tiny_model_dir),
        "--preset",
        "tiny",
        "--judge",
        "none",
        "--roles",
        "4",
        "--questions",
        "2",
        "--max-new-tokens",
        "5",
        "--batch-size",
        "2",
        "-q",
    ]
    plain, distributed = tmp_path / "plain", tmp_path / "ray"
    subprocess.run(
        [sys.executable, "-m", "personaxis.cli", "run", "--out", str(plain), *args], check=True, capture_output=True
    )
    result = subprocess.run(
        [sys.executable, "-m", "personaxis.cli", "run", "--out", str(distributed), "--ray", "local", *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "ray: 2 worker(s)" in result.stderr
    assert (plain / "manifest.json").read_text().split('"created"')[0] == (
        distributed / "manifest.json"
    ).read_text().split('"created"')[0]
    for path in sorted((plain / "rollouts").rglob("*.json")):
        assert path.read_bytes() == (distributed / path.relative_to(plain)).read_bytes()
    torch.testing.assert_close(
        load_axis(distributed / "axis.safetensors").vectors,
        load_axis(plain / "axis.safetensors").vectors,
        rtol=0,
        atol=1e-5,
    )
