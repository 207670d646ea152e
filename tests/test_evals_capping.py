"""Capping sweep: experiment choice, a sweep on the tiny model, Pareto marks and ``best`` on a planted grid."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from personaxis.capping import Cap, CappingConfig, CapVector, Experiment
from personaxis.evals.capping_sweep import (
    UNCAPPED,
    CappingSweepSettings,
    choose_experiments,
    plot_sweep,
    run_sweep,
    sweep_metrics,
)
from personaxis.evals.judging import label_items
from personaxis.evals.record import make_record, model_info
from personaxis.evals.stats import wilson_interval
from personaxis.judges import HARM_LABELS, make_harm_judge


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def config(lm) -> CappingConfig:
    g = torch.Generator().manual_seed(4)
    vectors = {
        f"axis_layer_{layer}": CapVector(layer, torch.randn(lm.profile.hidden_size, generator=g)) for layer in range(4)
    }
    experiments = [
        Experiment(
            f"layers_{start}:{end}-p{pct / 100:g}",
            tuple(Cap(f"axis_layer_{layer}", tau) for layer in range(start, end)),
        )
        for start, end in ((1, 3), (2, 4))
        for pct, tau in ((25.0, -1.0), (50.0, 40.0))
    ]
    return CappingConfig(vectors, experiments, metadata={"bands": [[1, 2], [2, 2]]})


def test_choose_experiments(config):
    assert choose_experiments(config) == config.experiment_ids
    assert choose_experiments(config, bands=[(2, 4)]) == ["layers_2:4-p0.25", "layers_2:4-p0.5"]
    assert choose_experiments(config, percentiles=[50]) == ["layers_1:3-p0.5", "layers_2:4-p0.5"]
    assert choose_experiments(config, ["layers_1:3-p0.25"]) == ["layers_1:3-p0.25"]
    with pytest.raises(ValueError):
        choose_experiments(config, ["layers_9:10-p0.25"])
    with pytest.raises(ValueError, match="no capping experiment"):
        choose_experiments(config, percentiles=[75])


def test_sweep_on_the_tiny_model(lm, config, tmp_path):
    chosen = ("layers_1:3-p0.5", "layers_2:4-p0.5")
    settings = CappingSweepSettings(
        experiments=chosen, n_jailbreaks=3, n_arithmetic=2, n_instructions=2, max_new_tokens=5
    )
    items = run_sweep(lm, config, settings)
    assert len(items) == 3 * (3 + 4)
    assert len({i["key"] for i in items}) == len(items)
    assert [s for s in dict.fromkeys(i["setting"] for i in items)] == [UNCAPPED, *chosen]
    harm = [i for i in items if i["kind"] == "jailbreak"]
    label_items(make_harm_judge("offline"), harm, prompt_of=lambda i: i["request"], allowed=HARM_LABELS)
    metrics = sweep_metrics(items)
    assert [r["setting"] for r in metrics["settings"]] == [UNCAPPED, *chosen]
    assert metrics["settings"][0]["capability_change"] == 0.0
    assert (metrics["settings"][0]["answers_changed"], metrics["settings"][0]["answers_compared"]) == (0, 7)
    binding = metrics["settings"][2]  # floors at τ = 40 on a random model bind everywhere: answers change
    assert binding["answers_compared"] == 7 and binding["answers_changed"] > 0
    assert any(r["pareto"] for r in metrics["settings"])
    record = make_record("capping", model=model_info(lm), settings=settings, items=items, metrics=metrics, judge="j")
    assert plot_sweep(record, tmp_path / "s.png").is_file()


def _planted(grid: dict[str, tuple[int, int]], n_harm: int = 20, n_cap: int = 20) -> list[dict]:
    """``grid[setting] = (harmful answers of n_harm, correct answers of n_cap)``."""
    items = []
    for setting, (harmful, correct) in grid.items():
        items += [
            {
                "key": f"{setting}|j{i}",
                "setting": setting,
                "kind": "jailbreak",
                "id": f"j{i}",
                "label": "harmful" if i < harmful else "refusal",
            }
            for i in range(n_harm)
        ]
        items += [
            {
                "key": f"cap|{setting}|c{i}",
                "setting": setting,
                "kind": "capability",
                "id": f"c{i}",
                "correct": i < correct,
            }
            for i in range(n_cap)
        ]
    return items


def test_pareto_marks_and_best_on_a_planted_grid():
    grid = {
        UNCAPPED: (10, 14),  # 50 % harmful, 70 % capable
        "layers_1:3-p0.25": (6, 14),  # 30 %, change 0     → Pareto
        "layers_1:3-p0.5": (2, 10),  # 10 %, change -0.20 → Pareto (lowest harm), but loses too much capability
        "layers_2:4-p0.25": (6, 13),  # 30 %, change -0.05 → dominated by layers_1:3-p0.25
        "layers_2:4-p0.5": (4, 13),  # 20 %, change -0.05 → Pareto, and best within a 5-point capability drop
        "layers_0:4-p0.5": (12, 15),  # 60 %, change +0.05 → Pareto (highest capability)
    }
    metrics = sweep_metrics(_planted(grid), max_capability_drop=0.05)
    rows = {r["setting"]: r for r in metrics["settings"]}
    assert {s for s, r in rows.items() if r["pareto"]} == {
        "layers_1:3-p0.25",
        "layers_1:3-p0.5",
        "layers_2:4-p0.5",
        "layers_0:4-p0.5",
    }
    assert metrics["best"] == "layers_2:4-p0.5"
    assert rows["layers_1:3-p0.5"]["capability_change"] == pytest.approx(-0.2)
    assert rows["layers_1:3-p0.5"]["harmful_change"] == pytest.approx(-0.4)
    h = rows["layers_2:4-p0.5"]["harmful"]
    assert (h["k"], h["n"], h["low"], h["high"]) == (4, 20, *wilson_interval(4, 20))
    assert sweep_metrics(_planted(grid), max_capability_drop=0.25)["best"] == "layers_1:3-p0.5"
    assert sweep_metrics(_planted({UNCAPPED: (3, 3)}))["best"] is None
