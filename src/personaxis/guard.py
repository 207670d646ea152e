"""Guard mode's rule: capping switches on for an answer while its projection drifts, and off once it recovers.

The one rule behind ``cap: "auto"`` in the server's batcher (:mod:`personaxis.web.batcher`), the guard evaluation
(:mod:`personaxis.evals.guard`) and the guard inside vLLM (:mod:`personaxis.backends.vllm_guard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from personaxis.interventions import Operator

Interventions = dict[int, list[Operator]]


@dataclass(frozen=True)
class GuardPlan:
    """Capping for one row that switches on when the projection drifts below ``threshold`` (guard mode)."""

    interventions: Interventions
    threshold: float
    window: int = 8
    hysteresis: float = 0.0


@dataclass(frozen=True)
class GuardSwitch:
    """Guard mode switched capping on or off after ``n_tokens`` tokens; ``projection`` is the window's mean."""

    on: bool
    n_tokens: int
    projection: float


def guard_switch(plan: GuardPlan, projections: Sequence[float], on: bool) -> GuardSwitch | None:
    """Guard mode's rule after a token: switch capping on when the mean projection of the last ``window`` tokens
    falls below the threshold, off again once it rises above ``threshold + hysteresis``; ``None``: no switch."""
    if len(projections) < plan.window:
        return None
    mean = sum(projections[-plan.window :]) / plan.window
    if not on and mean < plan.threshold:
        return GuardSwitch(True, len(projections), mean)
    if on and mean > plan.threshold + plan.hysteresis:
        return GuardSwitch(False, len(projections), mean)
    return None
