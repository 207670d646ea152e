"""Named role-vector recipes (--vectors reference | paper | pooled), recorded in the index, axis and summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import tiny_model
from typer.testing import CliRunner

from personaxis.cli import app
from personaxis.io.tensor_files import load_axis
from personaxis.pipeline import Pipeline
from personaxis.settings import RunSettings
from personaxis.store import load_tensors, read_json

# Scores the fake judge gives each role's 4 answers: all fully; 2 fully + 2 somewhat; all somewhat; none.
SCORES = {"analyst": [3, 3, 3, 3], "ghost": [3, 3, 2, 2], "bard": [2, 2, 2, 2], "cynic": [1, 1, 0, 1]}


class ScriptedJudge:
    name = "scripted"

    def score(self, items, *, show_progress=False):
        out = {}
        for item in items:
            question = int(item.key.rsplit("/q", 1)[1])
            out[item.key] = SCORES[item.role][sorted(QUESTION_IDS).index(question)]
        return out


class ScriptedTraitJudge:
    name = "scripted-trait"

    def score(self, items, *, show_progress=False):
        return {item.key: 90 if "-pos/" in item.key else 10 for item in items}


QUESTION_IDS: list[int] = []


def _settings(**kw) -> RunSettings:
    base = dict(model="tiny", judge="offline", role_names=tuple(SCORES), n_questions=4, max_new_tokens=4, n_traits=2)
    base.update(kw)
    return RunSettings.from_preset("tiny", **base)


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory) -> Path:
    """A run directory generated, extracted and judged once (4 roles x 4 questions, 2 traits judged 90 / 10)."""
    import personaxis.judges as judges

    out = tmp_path_factory.mktemp("recipes") / "run"
    settings = _settings(vectors="reference", judge_traits=True)
    pipeline = Pipeline(out, settings, lm=tiny_model("llama"), show_progress=False)
    QUESTION_IDS[:] = [q.id for q in pipeline.questions]
    originals = judges.make_judge, judges.make_trait_judge
    judges.make_judge = lambda spec, **kw: ScriptedJudge()  # type: ignore[assignment]
    judges.make_trait_judge = lambda spec, **kw: ScriptedTraitJudge()  # type: ignore[assignment]
    try:
        pipeline.run(["generate", "extract", "judge"])
    finally:
        judges.make_judge, judges.make_trait_judge = originals
    return out


def _recompute(src: Path, dst: Path, **kw) -> tuple[Pipeline, dict]:
    """The vectors, axis and space stages of ``src``'s rollouts under other recipe settings."""
    shutil.copytree(src, dst)
    pipeline = Pipeline(dst, _settings(**kw), show_progress=False)
    pipeline.stage_vectors()
    pipeline.stage_axis()
    pipeline.stage_space()
    return pipeline, json.loads((dst / "summary.json").read_text())


def _fully_vector(root: Path, role: str) -> torch.Tensor:
    return load_tensors(root / "vectors" / "roles" / f"{role}.safetensors")["fully"]


def test_reference_recipe_keeps_fully_played_roles_only(judged_run, tmp_path):
    _, summary = _recompute(judged_run, tmp_path / "r", vectors="reference", min_count=2, judge_traits=True)
    assert summary["vector_recipe"] == "reference" and summary["min_count"] == 2
    assert {r["name"] for r in summary["roles"]} == {"analyst", "ghost"}
    assert summary["n_roles_dropped"] == 2 and summary["n_roles_fell_back"] == 0
    # Judged traits: every pair differs by 80 >= 50, but 4 pairs are fewer than the 10 a trait needs.
    index = read_json(tmp_path / "r" / "vectors" / "index.json")
    assert index["trait_details"]["calm"]["n_pairs_kept"] == 4 and index["traits"] == []
    axis = load_axis(tmp_path / "r" / "axis.safetensors")
    assert axis.metadata["vector_recipe"] == "reference" and axis.metadata["n_roles_fell_back"] == 0
    default = load_tensors(tmp_path / "r" / "vectors" / "default.safetensors")["vector"]
    expected = default - (_fully_vector(tmp_path / "r", "analyst") + _fully_vector(tmp_path / "r", "ghost")) / 2
    torch.testing.assert_close(axis.vectors, expected)


def test_pooled_recipe_falls_back_and_says_so(judged_run, tmp_path):
    _, summary = _recompute(judged_run, tmp_path / "p", vectors="pooled", min_count=3)
    sources = {r["name"]: r["vector_source"] for r in summary["roles"]}
    assert sources == {"analyst": "fully", "ghost": "fully+somewhat", "bard": "fully+somewhat"}
    assert summary["n_roles_fell_back"] == 2 and summary["n_roles_dropped"] == 1


def test_paper_recipe_keeps_fully_and_somewhat_vectors_apart(judged_run, tmp_path):
    root = tmp_path / "q"
    _, summary = _recompute(judged_run, root, vectors="paper", min_count=2)
    points = sorted((r["name"], r["group"]) for r in summary["roles"])
    assert points == [("analyst", "fully"), ("bard", "somewhat"), ("ghost", "fully"), ("ghost", "somewhat")]
    assert summary["n_space_vectors"] == 4 and summary["n_roles_in_axis"] == 2 and summary["n_roles_kept"] == 3
    axis = load_axis(root / "axis.safetensors")
    default = load_tensors(root / "vectors" / "default.safetensors")["vector"]
    expected = default - (_fully_vector(root, "analyst") + _fully_vector(root, "ghost")) / 2
    torch.testing.assert_close(axis.vectors, expected)  # the axis from the fully role-playing vectors only
    index = read_json(root / "vectors" / "index.json")
    assert {r["name"]: r["vector_source"] for r in index["roles"]}["bard"] == "space only"
    assert "somewhat" in (root / "report.html").read_text()


def test_trait_analysis_in_summary_and_report(judged_run, tmp_path):
    _, summary = _recompute(judged_run, tmp_path / "t", vectors="pooled", min_count=3)
    traits = summary["trait_space"]
    assert traits["n_traits"] == 2 and len(traits["traits"]) == 2
    assert traits["pca"] is not None and -1 <= traits["traits"][0]["cos_axis"] <= 1
    assert traits["traits"][0]["cos_axis"] >= traits["traits"][1]["cos_axis"]  # ranked from the Assistant end
    assert "Traits along the axis" in (tmp_path / "t" / "report.html").read_text()


def test_presets_and_recipe_defaults():
    paper = RunSettings.from_preset("paper")
    assert (paper.vectors, paper.min_count, paper.temperature, paper.top_p) == ("reference", 50, 0.7, 0.9)
    assert RunSettings.from_preset("paper", vectors="paper").min_count == 10
    assert RunSettings.from_preset("paper", vectors="paper", min_count=7).min_count == 7
    assert (
        paper.judge_traits and paper.judges_traits and not RunSettings.from_preset("paper", judge="none").judges_traits
    )
    quick = RunSettings.from_preset("quick")
    # The reference's rule at the quick presets' scale (quick-openings' results unchanged: no role of it falls back).
    assert (quick.vectors, quick.min_count, quick.temperature, quick.top_p) == ("reference", 3, 0.0, 1.0)
    openings = RunSettings.from_preset("quick-openings")
    assert (openings.vectors, openings.min_count, openings.judge) == ("reference", 3, "offline")
    assert not quick.judge_traits and RunSettings.from_preset("quick", vectors="reference").min_count == 50
    assert RunSettings.from_preset("quick", top_p=0.5).top_p == 0.5
    with pytest.raises(ValueError, match="top-p"):
        RunSettings.from_preset("quick", top_p=1.5)
    with pytest.raises(ValueError, match="unknown vector recipe"):
        RunSettings.from_preset("quick", vectors="mean")
    # The offline judge was fitted on the embedded model: the paper preset asks for a judge on any other model.
    with pytest.raises(ValueError, match="--judge offline to use it anyway"):
        RunSettings.from_preset("paper", model="some/other-model")
    assert RunSettings.from_preset("paper", model="some/other-model", judge="offline").judge == "offline"


def test_top_p_reaches_sampling(tmp_path):
    pipeline = Pipeline(tmp_path / "run", _settings(temperature=0.7, top_p=0.9), show_progress=False)
    config = pipeline._sampling_config()
    assert (config.temperature, config.top_p) == (0.7, 0.9)


def test_cli_paper_preset_refuses_offline_judge_on_other_models(tmp_path):
    result = CliRunner().invoke(
        app, ["run", "--out", str(tmp_path / "r"), "--preset", "paper", "--model", str(tmp_path)]
    )
    assert result.exit_code == 2 and "error: the offline judge was fitted" in result.output
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), "--vectors", "nope"])
    assert result.exit_code == 2 and "unknown vector recipe" in result.output


def test_too_few_roles_is_a_user_error(judged_run, tmp_path):
    from personaxis.vectors import TooFewRolesError

    with pytest.raises(TooFewRolesError, match="recipe 'reference'.*use --vectors pooled"):
        _recompute(judged_run, tmp_path / "few", vectors="reference", min_count=5)


def test_asking_a_run_again_with_another_recipe_recomputes_only_the_vectors(judged_run, tmp_path):
    root = tmp_path / "again"
    shutil.copytree(judged_run, root)
    first = Pipeline(root, _settings(vectors="reference", min_count=2), show_progress=False)
    first.run(["vectors", "axis", "space"])
    rollouts = {p: p.stat().st_mtime_ns for p in (root / "activations").rglob("*.safetensors")}
    again = Pipeline(root, _settings(vectors="paper", min_count=2), show_progress=False)
    done = again.run(["generate", "extract", "vectors", "axis", "space"])
    assert done["generate"] == done["extract"] == 0 and done["vectors"] == done["axis"] == done["space"] == 1
    assert {p: p.stat().st_mtime_ns for p in (root / "activations").rglob("*.safetensors")} == rollouts
    summary = json.loads((root / "summary.json").read_text())
    assert summary["vector_recipe"] == "paper" and summary["n_space_vectors"] == 4
    assert read_json(root / "manifest.json")["settings"]["vectors"] == "paper"
    with pytest.raises(Exception, match="other settings"):  # anything else still refuses to mix
        Pipeline(root, _settings(vectors="paper", min_count=2, max_new_tokens=5), show_progress=False).run(["vectors"])


def test_a_run_made_before_the_recipe_settings_existed_still_opens(judged_run, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(judged_run, root)
    manifest = read_json(root / "manifest.json")
    for key in ("vectors", "judge_traits", "top_p", "traits_dir"):
        manifest["settings"].pop(key)
    manifest["settings"]["min_count"] = 2
    (root / "manifest.json").write_text(json.dumps(manifest))
    from personaxis.pipeline import open_existing

    open_existing(root, show_progress=False).run(["vectors", "axis", "space"])  # as `personaxis vectors --out` does
    settings = read_json(root / "manifest.json")["settings"]
    assert (settings["vectors"], settings["judge_traits"], settings["top_p"]) == ("pooled", False, 1.0)
    assert json.loads((root / "summary.json").read_text())["vector_recipe"] == "pooled"
