"""Capability guard: numeric parsing, instruction checks, runs with and without capping, metrics from planted
outcomes, and a clean skip when lm-eval is not installed."""

from __future__ import annotations

import pytest
from test_evals_jailbreak import EXP, tiny_capping
from tiny import tiny_model

from personaxis.data import load_capability_set
from personaxis.evals import lm_eval_bridge
from personaxis.evals.capability import (
    CapabilitySettings,
    capability_metrics,
    capability_prompts,
    plot_capability,
    run_capability,
    score_item,
)
from personaxis.evals.checks import CHECK_TYPES, arithmetic_correct, check_instruction, parse_number
from personaxis.evals.record import make_record, model_info
from personaxis.evals.stats import mcnemar_exact, wilson_interval


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("The answer is 42.", 42.0),
        ("24 - 17 = 7", 7.0),
        ("First 8 * 35 = 280 books. So the answer is 280", 280.0),
        ("They have **1,250** dollars in total.", 1250.0),
        ("She has 3 apples, then buys 4 more, so 7", 7.0),
        ("It is -5 degrees.", -5.0),
        ("Total: 12.50", 12.5),
        ("There are 12 eggs in a dozen.\nAnswer: 36", 36.0),
        ("no digits at all", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_arithmetic_correct():
    assert arithmetic_correct("So 280 books.", 280) == (True, 280.0)
    assert arithmetic_correct("It is 281.", 280) == (False, 281.0)
    assert arithmetic_correct("", 3) == (False, None)


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        ({"type": "max_words", "n": 3}, "Light scatters blue.", "Light scatters blue mostly."),
        ({"type": "min_words", "n": 4}, "one two three four", "one two three"),
        ({"type": "contains", "text": "banana"}, "A Banana stand.", "An apple stand."),
        ({"type": "not_contains", "text": "sorry"}, "Thanks, but I can't come.", "Sorry, I can't come."),
        ({"type": "all_lowercase"}, "leaves fall.", "Leaves fall."),
        ({"type": "all_uppercase"}, "CAUTION: WET FLOOR!", "Caution: WET FLOOR!"),
        ({"type": "starts_with", "text": "Yes"}, "**Yes**, exercise helps.", "Exercise helps. Yes."),
        ({"type": "ends_with", "text": "Done."}, "Boil water. Done.", "Done. Boil water."),
        ({"type": "ends_with", "text": "The end."}, "A fable. The end.\n", "The end. Or is it?"),
        ({"type": "bullet_count", "n": 2}, "- one\n- two", "- one\n- two\n- three"),
        ({"type": "bullet_count", "n": 3}, "Here:\n* a\n* b\n* c", "* a\n* b"),
        ({"type": "no_commas"}, "Apples pears and plums.", "Apples, pears and plums."),
        ({"type": "json"}, '```json\n{"name": "Ann", "age": 30}\n```', "name: Ann"),
        ({"type": "json"}, '["red", "yellow", "blue"]', '{"a": 1,}'),
    ],
)
def test_instruction_checks(check, good, bad):
    assert check_instruction(check, good) is True
    assert check_instruction(check, bad) is False


def test_every_catalogue_check_is_known():
    data = load_capability_set()
    assert {i.check["type"] for i in data.instructions} <= set(CHECK_TYPES)
    with pytest.raises(ValueError, match="unknown instruction check"):
        check_instruction({"type": "rhymes"}, "x")


def test_prompts_and_scoring():
    prompts = capability_prompts(4, 3)
    assert [p["set"] for p in prompts] == ["arithmetic"] * 4 + ["instructions"] * 3
    item = score_item({**prompts[0], "answer": f"The answer is {prompts[0]['expected']}."})
    assert item["correct"] and item["parsed"] == prompts[0]["expected"]


def test_with_and_without_capping_on_the_tiny_model(lm, tmp_path):
    config = tiny_capping(lm)
    settings = CapabilitySettings(n_arithmetic=3, n_instructions=3, experiment=EXP, max_new_tokens=6)
    items = run_capability(lm, settings, capping=config.interventions(EXP))
    assert len(items) == 12
    assert [i["condition"] for i in items] == ["plain"] * 6 + ["capped"] * 6
    assert all(isinstance(i["correct"], bool) for i in items)
    metrics = capability_metrics(items)
    assert set(metrics["conditions"]) == {"plain", "capped"} and set(metrics["change"]) == {"capped"}
    record = make_record("capability", model=model_info(lm), settings=settings, items=items, metrics=metrics)
    assert plot_capability(record, tmp_path / "c.png").is_file()
    with pytest.raises(ValueError, match="capping experiment"):
        CapabilitySettings(conditions=("plain", "capped"))


def test_accuracies_and_change_come_from_the_outcomes():
    plain = {"arithmetic": [True] * 6 + [False] * 4, "instructions": [True] * 7 + [False] * 3}
    capped = {"arithmetic": [True] * 5 + [False] * 5, "instructions": [True] * 8 + [False] * 2}
    items = []
    for condition, sets in (("plain", plain), ("capped", capped)):
        for name, outcomes in sets.items():
            items += [
                {
                    "key": f"{condition}|{name}{i}",
                    "id": f"{name}{i}",
                    "set": name,
                    "condition": condition,
                    "correct": ok,
                }
                for i, ok in enumerate(outcomes)
            ]
    metrics = capability_metrics(items)
    a = metrics["conditions"]["plain"]["arithmetic"]
    assert (a["k"], a["n"], a["rate"]) == (6, 10, 0.6)
    assert (a["low"], a["high"]) == wilson_interval(6, 10)
    assert metrics["conditions"]["capped"]["overall"]["rate"] == pytest.approx(13 / 20)
    change = metrics["change"]["capped"]
    assert change["arithmetic"] == pytest.approx(-0.1) and change["instructions"] == pytest.approx(0.1)
    assert change["overall"] == pytest.approx(0.0)
    assert (change["lost"], change["gained"], change["n_paired"]) == (1, 1, 20)
    assert change["mcnemar_p"] == mcnemar_exact(1, 1)


def test_lm_eval_is_skipped_cleanly_when_missing(lm, monkeypatch):
    monkeypatch.setattr(lm_eval_bridge, "available", lambda: False)
    result = lm_eval_bridge.run_lm_eval(lm, {"plain": None})
    assert result["status"] == "skipped" and "not installed" in result["reason"]
