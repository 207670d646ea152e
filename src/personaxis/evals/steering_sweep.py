"""Steering sweep: how answers to identity questions change as the model is pushed along the Assistant Axis.

For assistant-like roles (system prompts of ordinary professions) and identity questions ("Who are you?"), generate
an answer at each steering coefficient α (a fraction of the layer's mean residual norm, ``h ← h + α·r_l·â``) at each
chosen set of layers; an identity judge labels each answer (assistant, human role, non-human role, mystical,
nonsense). The paper: steering away (α < 0) makes the model take on other identities, at extremes a mystical,
theatrical style; steering toward it keeps the Assistant.

    items = generate_sweep(lm, axis, SteeringSettings(alphas=(-0.6, 0, 0.3)))
    label_items(make_identity_judge("offline"), items, ...)
    metrics = steering_metrics(items)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaxis.axis import Axis
from personaxis.chat import build_conversation
from personaxis.data import load_identity_questions, load_susceptibility_roles
from personaxis.evals.record import new_figure, save_figure
from personaxis.evals.stats import evenly_spaced, label_shares, rate_of
from personaxis.generation import SamplingConfig, generate
from personaxis.judges import IDENTITY_LABELS
from personaxis.models import LoadedModel
from personaxis.steering import steering_interventions

NAME = "steering"
DEFAULT_ALPHAS: tuple[float, ...] = (-1.0, -0.6, -0.3, 0.0, 0.3, 0.5)


@dataclass(frozen=True)
class SteeringSettings:
    """``layer_sets``: each entry is a tuple of layers steered together (``None``: the axis' target layer)."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    layer_sets: tuple[tuple[int, ...], ...] | None = None
    n_roles: int | None = 10
    prompts_per_role: int = 1
    n_questions: int | None = 3
    limit: int | None = None  # at most this many prompts per α (after the sizes above)
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ValueError("give at least one steering coefficient")
        if self.prompts_per_role < 1:
            raise ValueError(f"prompts_per_role must be at least 1, got {self.prompts_per_role}")


def sweep_prompts(settings: SteeringSettings) -> list[dict[str, Any]]:
    """The (role, system prompt, question) triples of the sweep: roles and questions spread over the catalogue."""
    roles = load_susceptibility_roles()
    questions = load_identity_questions()
    chosen_roles = [roles[i] for i in evenly_spaced(len(roles), settings.n_roles)]
    chosen_questions = questions[: settings.n_questions] if settings.n_questions is not None else questions
    prompts = []
    for role in chosen_roles:
        for p_index, system in enumerate(role.system_prompts[: settings.prompts_per_role]):
            for q_index, question in enumerate(chosen_questions):
                prompts.append(
                    {
                        "role": role.name,
                        "prompt_index": p_index,
                        "system_prompt": system,
                        "question_index": q_index,
                        "question": question,
                    }
                )
    return prompts[: settings.limit] if settings.limit is not None else prompts


def _key(layers: Sequence[int], alpha: float, prompt: dict[str, Any]) -> str:
    return f"L{'-'.join(map(str, layers))}|a{alpha:+g}|{prompt['role']}|p{prompt['prompt_index']}|q{prompt['question_index']}"


def generate_sweep(
    lm: LoadedModel, axis: Axis, settings: SteeringSettings, *, show_progress: bool = False
) -> list[dict[str, Any]]:
    """Unlabelled items: one answer per (layer set, α, prompt). α = 0 is generated once and shared by all layer sets."""
    axis.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
    assert axis.target_layer is not None
    layer_sets = [tuple(s) for s in (settings.layer_sets or ((axis.target_layer,),))]
    prompts = sweep_prompts(settings)
    conversations = [build_conversation(p["system_prompt"], p["question"]) for p in prompts]
    config = SamplingConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed,
        batch_size=settings.batch_size,
    )
    unsteered = None
    items: list[dict[str, Any]] = []
    for layers in layer_sets:
        for alpha in settings.alphas:
            if alpha == 0:
                if unsteered is None:
                    unsteered = generate(lm, conversations, config, show_progress=show_progress, desc="α=0")
                answers = unsteered
            else:
                ops = steering_interventions(axis, list(layers), alpha)
                answers = generate(
                    lm,
                    conversations,
                    config,
                    interventions=ops,
                    show_progress=show_progress,
                    desc=f"L{','.join(map(str, layers))} α={alpha:+g}",
                )
            for prompt, answer in zip(prompts, answers, strict=True):
                items.append(
                    {
                        "key": _key(layers, alpha, prompt),
                        "layers": list(layers),
                        "alpha": float(alpha),
                        "role": prompt["role"],
                        "prompt_index": prompt["prompt_index"],
                        "question_index": prompt["question_index"],
                        "question": prompt["question"],
                        "answer": answer.text,
                        "new_tokens": answer.new_tokens,
                        "stopped": answer.stopped,
                    }
                )
    return items


def steering_metrics(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Label shares per (layer set, α), and the non-assistant rate with its Wilson 95 % interval."""
    groups: dict[tuple[tuple[int, ...], float], list[str | None]] = {}
    for item in items:
        groups.setdefault((tuple(item["layers"]), float(item["alpha"])), []).append(item.get("label"))
    rows = []
    for (layers, alpha), labels in sorted(groups.items()):
        shares = label_shares(labels, IDENTITY_LABELS)
        rows.append(
            {
                "layers": list(layers),
                "alpha": alpha,
                **shares,
                "non_assistant": rate_of(labels, [c for c in IDENTITY_LABELS if c != "assistant"]).to_dict(),
            }
        )
    return {"labels": list(IDENTITY_LABELS), "by_setting": rows}


def plot_steering(record: dict[str, Any], path: str | Path) -> Path:
    """Label shares against α, one panel per layer set."""
    rows = record["metrics"]["by_setting"]
    layer_sets = list(dict.fromkeys(tuple(r["layers"]) for r in rows))
    fig = new_figure(5.2 * len(layer_sets) + 1.5, 4.2)
    axes = fig.subplots(1, len(layer_sets), squeeze=False)[0]
    for ax, layers in zip(axes, layer_sets, strict=True):
        mine = sorted((r for r in rows if tuple(r["layers"]) == layers), key=lambda r: r["alpha"])
        xs = [r["alpha"] for r in mine]
        for index, label in enumerate(record["metrics"]["labels"]):
            ys = [r["shares"][label] if r["shares"][label] is not None else float("nan") for r in mine]
            ax.plot(xs, ys, "-o", color=f"C{index}", label=label.replace("_", " "), ms=4)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("α (fraction of the layer's mean residual norm)")
        ax.set_ylabel("share of answers")
        n = mine[0]["n"] if mine else 0
        ax.set_title(f"steering at layer(s) {', '.join(map(str, layers))} (n = {n} per α)", fontsize=10)
    axes[-1].legend(fontsize=8, loc="best")
    model = record["model"]["name"]
    fig.suptitle(f"Steering along the Assistant Axis ({model})\nidentity labels by {record['judge']}", fontsize=10)
    return save_figure(fig, path)
