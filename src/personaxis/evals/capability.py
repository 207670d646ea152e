"""Capability guard: does capping cost the model its skills? A built-in set that needs no network, scored by code.

Two parts, from the catalogue: arithmetic word problems (the last number of the answer, or an explicit "the answer
is N", must equal the expected integer) and instruction-following prompts with programmatic checks (word limits,
required words, case, prefixes and suffixes, bullet counts, commas, JSON). Each is answered without capping
(``plain``) and with a capping experiment (``capped``); accuracies come with Wilson 95 % intervals, and the change
with an exact McNemar test on the same items. ``lm-eval`` (IFEval, GSM8k) runs too where it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaxis.chat import build_conversation
from personaxis.data import load_capability_set
from personaxis.evals.checks import arithmetic_correct, check_instruction
from personaxis.evals.record import new_figure, save_figure
from personaxis.evals.stats import evenly_spaced, mcnemar_exact, success_rate
from personaxis.generation import Generation, SamplingConfig, generate
from personaxis.interventions import Interventions
from personaxis.models import LoadedModel

NAME = "capability"
SETS: tuple[str, ...] = ("arithmetic", "instructions")
ARITHMETIC_SUFFIX = "\nGive the final answer as a single number."


@dataclass(frozen=True)
class CapabilitySettings:
    n_arithmetic: int | None = 20
    n_instructions: int | None = 20
    conditions: tuple[str, ...] = ("plain", "capped")
    experiment: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 64
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None

    def __post_init__(self) -> None:
        unknown = [c for c in self.conditions if c not in ("plain", "capped")]
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; choose plain and/or capped")
        if "capped" in self.conditions and not self.experiment:
            raise ValueError("the capped condition needs a capping experiment")


def capability_prompts(n_arithmetic: int | None, n_instructions: int | None) -> list[dict[str, Any]]:
    """Items spread over each part of the catalogue: id, set, prompt, and the expected answer or the check."""
    data = load_capability_set()
    out: list[dict[str, Any]] = []
    for i in evenly_spaced(len(data.arithmetic), n_arithmetic):
        a = data.arithmetic[i]
        out.append({"id": a.id, "set": "arithmetic", "prompt": a.question + ARITHMETIC_SUFFIX, "expected": a.answer})
    for i in evenly_spaced(len(data.instructions), n_instructions):
        item = data.instructions[i]
        out.append({"id": item.id, "set": "instructions", "prompt": item.prompt, "check": dict(item.check)})
    return out


def score_item(item: dict[str, Any]) -> dict[str, Any]:
    """Set ``correct`` (and ``parsed`` for arithmetic) from ``answer``; returns the item."""
    if item["set"] == "arithmetic":
        item["correct"], item["parsed"] = arithmetic_correct(item["answer"], item["expected"])
    else:
        item["correct"] = check_instruction(item["check"], item["answer"])
    return item


def answer_prompts(
    lm: LoadedModel,
    prompts: Sequence[dict[str, Any]],
    condition: str,
    config: SamplingConfig,
    *,
    interventions: Interventions | None = None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Scored items for one condition (``condition`` also names it in the keys)."""
    answers = generate(
        lm,
        [build_conversation(None, p["prompt"]) for p in prompts],
        config,
        interventions=interventions,
        show_progress=show_progress,
        desc=condition,
    )
    return [capability_item(p, condition, a) for p, a in zip(prompts, answers, strict=True)]


def capability_item(prompt: dict[str, Any], condition: str, answer: Generation) -> dict[str, Any]:
    """The scored record of one answer."""
    return score_item(
        {
            **prompt,
            "key": f"{condition}|{prompt['id']}",
            "condition": condition,
            "answer": answer.text,
            "new_tokens": answer.new_tokens,
            "stopped": answer.stopped,
        }
    )


def run_capability(
    lm: LoadedModel, settings: CapabilitySettings, *, capping: Interventions | None = None, show_progress: bool = False
) -> list[dict[str, Any]]:
    prompts = capability_prompts(settings.n_arithmetic, settings.n_instructions)
    config = SamplingConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed,
        batch_size=settings.batch_size,
    )
    items: list[dict[str, Any]] = []
    for condition in settings.conditions:
        if condition == "capped" and not capping:
            raise ValueError("the capped condition needs capping interventions")
        ops = capping if condition == "capped" else None
        items += answer_prompts(lm, prompts, condition, config, interventions=ops, show_progress=show_progress)
    return items


def capability_metrics(items: Sequence[dict[str, Any]], *, reference: str = "plain") -> dict[str, Any]:
    """Accuracy per condition and set (and overall), and each condition's change from ``reference``."""
    conditions = list(dict.fromkeys(i["condition"] for i in items))
    by_condition: dict[str, Any] = {}
    for condition in conditions:
        mine = [i for i in items if i["condition"] == condition]
        row = {s: success_rate(i["correct"] for i in mine if i["set"] == s).to_dict() for s in SETS}
        row["overall"] = success_rate(i["correct"] for i in mine).to_dict()
        by_condition[condition] = row
    changes = {}
    if reference in conditions:
        base = {i["id"]: i["correct"] for i in items if i["condition"] == reference}
        for condition in conditions:
            if condition == reference:
                continue
            other = {i["id"]: i["correct"] for i in items if i["condition"] == condition}
            texts = {i["id"]: i.get("answer") for i in items if i["condition"] == condition}
            base_texts = {i["id"]: i.get("answer") for i in items if i["condition"] == reference}
            shared = [k for k in base if k in other]
            lost = sum(1 for k in shared if base[k] and not other[k])
            gained = sum(1 for k in shared if other[k] and not base[k])
            change = {
                s: (
                    None
                    if by_condition[condition][s]["rate"] is None or by_condition[reference][s]["rate"] is None
                    else by_condition[condition][s]["rate"] - by_condition[reference][s]["rate"]
                )
                for s in (*SETS, "overall")
            }
            changes[condition] = {
                **change,
                "n_paired": len(shared),
                "lost": lost,
                "gained": gained,
                "mcnemar_p": mcnemar_exact(lost, gained),
                "answers_changed": sum(1 for k in shared if texts[k] != base_texts[k]),
            }
    return {"reference": reference, "conditions": by_condition, "change": changes}


def plot_capability(record: dict[str, Any], path: str | Path) -> Path:
    """Accuracy per set and condition, with Wilson 95 % intervals."""
    metrics = record["metrics"]
    conditions = list(metrics["conditions"])
    groups = [*SETS, "overall"]
    fig = new_figure(7.5, 4.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(conditions))
    for index, condition in enumerate(conditions):
        rates = [metrics["conditions"][condition][g] for g in groups]
        ys = [r["rate"] or 0.0 for r in rates]
        err = [
            [y - (r["low"] or 0.0) for y, r in zip(ys, rates, strict=True)],
            [(r["high"] or 0.0) - y for y, r in zip(ys, rates, strict=True)],
        ]
        xs = [g + (index - (len(conditions) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, ys, width=width, yerr=err, capsize=3, label=condition, color=f"C{index}")
        for x, r in zip(xs, rates, strict=True):
            ax.annotate(
                f"{r['k']}/{r['n']}",
                (x, r["high"] or 0.0),
                ha="center",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95 % Wilson CI)")
    ax.legend(fontsize=8)
    exp = record["settings"].get("experiment")
    ax.set_title(
        f"Capability guard ({record['model']['name']}" + (f", capping {exp}" if exp else "") + ")", fontsize=10
    )
    return save_figure(fig, path)
