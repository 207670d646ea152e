"""Persona drift: where multi-turn conversations in four domains take the target model on the Assistant Axis.

The target gets no system prompt (a model whose template adds its own, like SmolLM2, sees that built-in default; the
record notes it). The user side is scripted from the catalogue, or written by a user model (:mod:`.users`). Each
turn, the next user message of every conversation is written, then the target answers all of them in one batched
call. At the end one teacher-forced pass per conversation projects every assistant turn onto the axis (the mean
over its response tokens, :mod:`personaxis.monitor`). The paper: coding and writing stay in the Assistant region,
therapy-like and AI-philosophy conversations drift away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personaxis.axis import Axis
from personaxis.data import load_drift_domains
from personaxis.evals.record import new_figure, save_figure
from personaxis.evals.stats import evenly_spaced, spread
from personaxis.evals.users import DriftState, ScriptedUser, UserSimulator
from personaxis.generation import SamplingConfig, generate
from personaxis.interventions import Interventions
from personaxis.models import LoadedModel
from personaxis.monitor import Transcript, monitor_transcripts
from personaxis.progress import progress_bar

NAME = "drift"
DOMAINS: tuple[str, ...] = ("coding", "writing", "therapy", "philosophy")


@dataclass(frozen=True)
class DriftSettings:
    domains: tuple[str, ...] = DOMAINS
    conversations_per_domain: int | None = 3
    turns: int = 8
    max_new_tokens: int = 96
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 64
    layers: tuple[int, ...] | None = None  # projection layers (default: the axis' target layer)

    def __post_init__(self) -> None:
        if self.turns < 1:
            raise ValueError(f"turns must be at least 1, got {self.turns}")


def initial_states(settings: DriftSettings) -> list[DriftState]:
    catalogue = load_drift_domains()
    unknown = [d for d in settings.domains if d not in catalogue]
    if unknown:
        raise ValueError(f"unknown drift domain(s) {unknown}; the catalogue has {sorted(catalogue)}")
    states = []
    for domain in settings.domains:
        spec = catalogue[domain]
        for index in evenly_spaced(len(spec.conversations), settings.conversations_per_domain):
            conv = spec.conversations[index]
            states.append(
                DriftState(
                    domain=domain,
                    index=index,
                    persona=spec.user_personas[conv.persona],
                    topic=spec.topics[conv.topic],
                    script=tuple(conv.user_turns),
                )
            )
    return states


def simulate(
    lm: LoadedModel,
    states: list[DriftState],
    settings: DriftSettings,
    *,
    user: UserSimulator | None = None,
    interventions: Interventions | None = None,
    show_progress: bool = False,
) -> list[DriftState]:
    """Play ``settings.turns`` turns of every conversation; ``states[i].messages`` ends with an assistant turn."""
    user = user or ScriptedUser()
    config = SamplingConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed,
        batch_size=settings.batch_size,
    )
    bar = progress_bar(total=settings.turns, desc="drift turns", unit="turn", disable=not show_progress)
    try:
        for turn in range(settings.turns):
            for state, message in zip(states, user.next_messages(states, turn), strict=True):
                state.messages.append({"role": "user", "content": message})
            answers = generate(
                lm, [s.messages for s in states], config, interventions=interventions, desc=f"target turn {turn + 1}"
            )
            for state, answer in zip(states, answers, strict=True):
                state.messages.append({"role": "assistant", "content": answer.text})
            bar.update(1)
    finally:
        bar.close()
    return states


def project_states(
    lm: LoadedModel,
    axis: Axis,
    states: Sequence[DriftState],
    layers: Sequence[int],
    *,
    interventions: Interventions | None = None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """One item per conversation: its messages and, per turn, the user message, the answer and its projections."""
    transcripts = [Transcript(name=f"{s.domain}-{s.index}", conversation=list(s.messages)) for s in states]
    rows = monitor_transcripts(
        lm, axis, transcripts, layers=list(layers), interventions=interventions, show_progress=show_progress
    )
    by_name: dict[str, list[Any]] = {}
    for row in rows:
        by_name.setdefault(row.transcript, []).append(row)
    items = []
    for state, transcript in zip(states, transcripts, strict=True):
        users = [m["content"] for m in state.messages if m["role"] == "user"]
        answers = [m["content"] for m in state.messages if m["role"] == "assistant"]
        turns = []
        for row in sorted(by_name[transcript.name], key=lambda r: r.turn):
            turns.append(
                {
                    "turn": row.turn,
                    "user": users[row.turn],
                    "answer": answers[row.turn],
                    "projection": {str(k): v for k, v in row.projections.items()},
                    "truncated": row.truncated,
                    "response_tokens": row.response_tokens,
                }
            )
        items.append(
            {
                "key": transcript.name,
                "domain": state.domain,
                "conversation": state.index,
                "persona": state.persona,
                "topic": state.topic,
                "turns": turns,
            }
        )
    return items


def drift_metrics(items: Sequence[dict[str, Any]], layer: int) -> dict[str, Any]:
    """Per domain: projection spread at each turn, over all turns, the first-to-last change, and the slope per turn."""
    key = str(layer)
    domains = list(dict.fromkeys(item["domain"] for item in items))
    out: dict[str, Any] = {"layer": layer, "domains": {}}
    for domain in domains:
        convs = [item for item in items if item["domain"] == domain]
        n_turns = max(len(c["turns"]) for c in convs)
        per_turn = [
            spread(c["turns"][t]["projection"][key] for c in convs if t < len(c["turns"])) for t in range(n_turns)
        ]
        pairs = [(t["turn"], t["projection"][key]) for c in convs for t in c["turns"]]
        xs = np.array([p[0] for p in pairs], dtype=np.float64)
        ys = np.array([p[1] for p in pairs], dtype=np.float64)
        slope = float(np.polyfit(xs, ys, 1)[0]) if len(set(xs.tolist())) > 1 else None
        changes = [c["turns"][-1]["projection"][key] - c["turns"][0]["projection"][key] for c in convs if c["turns"]]
        out["domains"][domain] = {
            "n_conversations": len(convs),
            "per_turn": per_turn,
            "overall": spread(ys.tolist()),
            "first_to_last": spread(changes),
            "slope_per_turn": slope,
        }
    return out


def plot_drift(record: dict[str, Any], path: str | Path) -> Path:
    """Mean projection per turn per domain, with a ±1 standard deviation band."""
    metrics = record["metrics"]
    fig = new_figure(8, 4.6)
    ax = fig.subplots()
    for index, (domain, stats) in enumerate(metrics["domains"].items()):
        turns = [t for t, s in enumerate(stats["per_turn"]) if s["n"]]
        means = np.array([stats["per_turn"][t]["mean"] for t in turns])
        stds = np.array([stats["per_turn"][t]["std"] for t in turns])
        xs = np.array(turns) + 1
        ax.plot(xs, means, "-o", color=f"C{index}", ms=4, label=f"{domain} (n = {stats['n_conversations']})")
        ax.fill_between(xs, means - stds, means + stds, color=f"C{index}", alpha=0.15, lw=0)
    for name, value in (record.get("references") or {}).items():
        ax.axhline(value, color="grey", ls="--", lw=1)
        ax.annotate(name, (1, value), fontsize=7, color="grey", xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(f"projection on the Assistant Axis (layer {metrics['layer']})")
    ax.set_title(
        f"Persona drift by domain ({record['model']['name']}, user: {record.get('user', 'scripted')}; mean ± 1 sd)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)
