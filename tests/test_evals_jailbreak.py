"""Persona jailbreaks: conditions and capping on the tiny model, harmful rates and CIs from planted labels, figure."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from personaxis.capping import Cap, CappingConfig, CapVector, Experiment
from personaxis.evals.jailbreak import (
    JailbreakSettings,
    conversation_for,
    jailbreak_metrics,
    plot_jailbreak,
    run_jailbreak,
    select_jailbreaks,
)
from personaxis.evals.judging import label_items
from personaxis.evals.record import make_record, model_info
from personaxis.evals.stats import mcnemar_exact, wilson_interval
from personaxis.judges import HARM_LABELS, make_harm_judge

EXP = "layers_1:3-p0.5"


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def tiny_capping(lm, tau: float = 50.0) -> CappingConfig:
    """Floors high enough to bind at every position of a random model: capped answers must differ."""
    g = torch.Generator().manual_seed(2)
    vectors = {
        f"axis_layer_{layer}": CapVector(layer, torch.randn(lm.profile.hidden_size, generator=g)) for layer in (1, 2)
    }
    return CappingConfig(vectors, [Experiment(EXP, tuple(Cap(name, tau) for name in vectors))])


def test_selection_spreads_over_categories():
    items = select_jailbreaks(16)
    assert len(items) == 16
    assert len({j.category for j in items}) == 8
    item = items[0]
    assert conversation_for(item, "no_persona") == [{"role": "user", "content": item.request}]
    assert conversation_for(item, "persona_capped")[0] == {"role": "system", "content": item.persona_prompt}


def test_conditions_on_the_tiny_model(lm, tmp_path):
    config = tiny_capping(lm)
    settings = JailbreakSettings(
        limit=4,
        conditions=("no_persona", "persona", "persona_capped", "no_persona_capped"),
        experiment=EXP,
        max_new_tokens=5,
    )
    items = run_jailbreak(lm, settings, capping=config.interventions(EXP))
    assert len(items) == 16 and len({i["key"] for i in items}) == 16
    persona = [i["answer"] for i in items if i["condition"] == "persona"]
    capped = [i["answer"] for i in items if i["condition"] == "persona_capped"]
    assert persona != capped
    label_items(make_harm_judge("offline"), items, prompt_of=lambda i: i["request"], allowed=HARM_LABELS)
    assert all(i["label"] in HARM_LABELS for i in items)
    metrics = jailbreak_metrics(items)
    assert list(metrics["conditions"]) == list(settings.conditions)
    assert {(p["a"], p["b"]) for p in metrics["paired"]} == {
        ("persona", "persona_capped"),
        ("no_persona", "no_persona_capped"),
        ("no_persona", "persona"),
    }
    record = make_record("jailbreak", model=model_info(lm), settings=settings, items=items, metrics=metrics, judge="j")
    assert plot_jailbreak(record, tmp_path / "j.png").is_file()
    with pytest.raises(ValueError, match="needs capping"):
        run_jailbreak(lm, settings, capping=None)


def test_rates_cis_and_paired_test_come_from_the_labels():
    persona = ["harmful"] * 12 + ["refusal"] * 20 + ["redirect"] * 5 + ["harmless"] * 3
    capped = ["harmful"] * 4 + ["refusal"] * 28 + ["redirect"] * 5 + ["harmless"] * 3  # 8 harmful → refusal
    baseline = ["harmful"] * 2 + ["refusal"] * 36 + [None] * 2
    items = []
    for condition, labels in (("no_persona", baseline), ("persona", persona), ("persona_capped", capped)):
        items += [
            {
                "key": f"{condition}|{i}",
                "condition": condition,
                "id": f"jb-{i}",
                "label": label,
                "answer": f"answer {i}" + ("!" if condition == "persona_capped" and i < 10 else ""),
            }
            for i, label in enumerate(labels)
        ]
    metrics = jailbreak_metrics(items)
    p = metrics["conditions"]["persona"]["harmful"]
    assert (p["k"], p["n"], p["rate"]) == (12, 40, 0.3)
    assert (p["low"], p["high"]) == wilson_interval(12, 40)
    c = metrics["conditions"]["persona_capped"]
    assert c["harmful"]["rate"] == 0.1 and c["shares"]["refusal"] == pytest.approx(0.7)
    b = metrics["conditions"]["no_persona"]
    assert (b["harmful"]["k"], b["harmful"]["n"], b["unjudged"]) == (2, 38, 2)
    pair = next(x for x in metrics["paired"] if x["b"] == "persona_capped")
    assert (pair["harmful_a"], pair["harmful_b"], pair["only_a"], pair["only_b"]) == (12, 4, 8, 0)
    assert pair["relative_change"] == pytest.approx(-8 / 12)
    assert pair["mcnemar_p"] == pytest.approx(mcnemar_exact(8, 0))
    assert (pair["answers_changed"], pair["answers_compared"]) == (10, 40)
    base_vs_persona = next(x for x in metrics["paired"] if x["b"] == "persona")
    assert base_vs_persona["n"] == 38  # items unjudged in one condition are left out of the pairing


def test_settings_validation():
    with pytest.raises(ValueError, match="unknown condition"):
        JailbreakSettings(conditions=("persona", "roleplay"))
    with pytest.raises(ValueError, match="capping experiment"):
        JailbreakSettings(conditions=("persona_capped",))
