"""Steering sweep: prompts, generation per (layer set, α) on the tiny model, metrics from planted labels, figure."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from personaxis.axis import Axis
from personaxis.evals.judging import label_items
from personaxis.evals.record import make_record, model_info
from personaxis.evals.stats import wilson_interval
from personaxis.evals.steering_sweep import (
    SteeringSettings,
    generate_sweep,
    plot_steering,
    steering_metrics,
    sweep_prompts,
)
from personaxis.judges import IDENTITY_LABELS, make_identity_judge


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def axis(lm):
    g = torch.Generator().manual_seed(0)
    return Axis(
        torch.randn(lm.profile.n_layers, lm.profile.hidden_size, generator=g),
        model=lm.profile.name,
        residual_norms=torch.full((lm.profile.n_layers,), 4.0),
    )


def test_prompts_spread_roles_and_questions():
    prompts = sweep_prompts(SteeringSettings(n_roles=4, prompts_per_role=2, n_questions=3))
    assert len(prompts) == 4 * 2 * 3
    assert len({p["role"] for p in prompts}) == 4
    assert {p["question"] for p in prompts} == {"Who are you?", "What is your name?", "Where did you come from?"}
    assert len(sweep_prompts(SteeringSettings(n_roles=4, n_questions=3, limit=5))) == 5


def test_sweep_on_the_tiny_model(lm, axis, tmp_path):
    settings = SteeringSettings(
        alphas=(-8.0, 0.0, 8.0), layer_sets=((1,), (1, 2)), n_roles=2, n_questions=2, max_new_tokens=5
    )
    items = generate_sweep(lm, axis, settings)
    assert len(items) == 2 * 3 * 4
    assert len({i["key"] for i in items}) == len(items)
    plain = {tuple(i["layers"]): [i["answer"] for i in items if i["alpha"] == 0] for i in items}
    assert plain[(1,)] == plain[(1, 2)]  # α = 0 is generated once and shared
    steered = [i["answer"] for i in items if i["alpha"] == 8.0 and i["layers"] == [1, 2]]
    assert steered != plain[(1,)]  # a large push changes the greedy answers of a random model
    label_items(make_identity_judge("offline"), items, prompt_of=lambda i: i["question"], allowed=IDENTITY_LABELS)
    assert all(i["label"] in IDENTITY_LABELS for i in items)
    metrics = steering_metrics(items)
    assert [(r["layers"], r["alpha"]) for r in metrics["by_setting"]] == [
        ([1], -8.0),
        ([1], 0.0),
        ([1], 8.0),
        ([1, 2], -8.0),
        ([1, 2], 0.0),
        ([1, 2], 8.0),
    ]
    assert all(r["n"] == 4 for r in metrics["by_setting"])
    record = make_record("steering", model=model_info(lm), settings=settings, items=items, metrics=metrics, judge="x")
    png = plot_steering(record, tmp_path / "steering.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_are_computed_from_the_labels():
    planted = {
        -0.5: ["mystical"] * 3 + ["nonsense"] * 2 + ["assistant"] * 1 + [None] * 2,
        0.0: ["assistant"] * 8 + ["human_role"] * 2,
        0.5: ["assistant"] * 10,
    }
    items = [
        {"key": f"{a}-{i}", "layers": [15], "alpha": a, "label": label}
        for a, labels in planted.items()
        for i, label in enumerate(labels)
    ]
    rows = {r["alpha"]: r for r in steering_metrics(items)["by_setting"]}
    away = rows[-0.5]
    assert away["n"] == 6 and away["unjudged"] == 2
    assert away["shares"]["mystical"] == pytest.approx(0.5)
    assert away["shares"]["assistant"] == pytest.approx(1 / 6)
    assert away["non_assistant"]["k"] == 5
    assert (away["non_assistant"]["low"], away["non_assistant"]["high"]) == wilson_interval(5, 6)
    assert rows[0.0]["shares"]["human_role"] == pytest.approx(0.2)
    assert rows[0.5]["non_assistant"]["rate"] == 0.0
    assert sum(rows[0.0]["counts"].values()) == 10


def test_bad_settings():
    with pytest.raises(ValueError):
        SteeringSettings(alphas=())
    with pytest.raises(ValueError):
        SteeringSettings(prompts_per_role=0)
