"""The state the server's batcher keeps per request: a :class:`BatchRow` (its text so far, random stream,
projections, guard state) and a :class:`JoiningGroup` (requests whose prompts are being prefilled together, before
they join the running batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from personaxis.generation import answer_generator
from personaxis.interventions import FloorCap
from personaxis.web.jobs import Interventions, Job
from personaxis.web.stream import TextTracker


def has_cap(interventions: Interventions) -> bool:
    """Whether ``interventions`` cap the projection (a :class:`~personaxis.interventions.FloorCap` at any layer)."""
    return any(isinstance(op, FloorCap) for ops in interventions.values() for op in ops)


class BatchRow:
    """One request in the batch: its text so far, its random stream, the projections read at its positions, and
    whether a cap acts on it."""

    def __init__(self, job: Job, tokenizer: Any) -> None:
        self.job = job
        self.tracker = TextTracker(tokenizer, job.settings.stop)
        seed = job.settings.seed
        # The random stream of the first answer of `generate` with this seed.
        self.generator = answer_generator(int(seed), 0) if seed is not None else None
        self.projections: list[float] = []
        self.prompt_projections: list[float] = []
        self.pending = 0  # the token the next step feeds
        self.delta = ""  # text that became final with the pending token
        self.capped = job.guard is None and bool(job.interventions) and has_cap(job.interventions)
        self.guard_on = False
        self.capped_tokens = 0
        self.switches = 0
        self.done = False

    def interventions(self) -> Interventions:
        """The operators acting on the row now: its own, and the guard's while the guard is on."""
        if self.guard_on and self.job.guard is not None:
            merged = {layer: list(ops) for layer, ops in self.job.interventions.items()}
            for layer, ops in self.job.guard.interventions.items():
                merged.setdefault(layer, []).extend(ops)
            return merged
        return self.job.interventions

    @property
    def deadline(self) -> float:
        return self.job.deadline

    def running(self) -> float | None:
        """The mean projection of the answer's tokens so far."""
        return sum(self.projections) / len(self.projections) if self.projections else None

    @property
    def remaining(self) -> int:
        return self.job.settings.max_new_tokens - len(self.tracker.ids)


@dataclass
class JoiningGroup:
    """Requests being prefilled together: their left-padded prompts, their own cache, the positions fed so far and
    the projections read at them."""

    rows: list[BatchRow]
    ids: Tensor
    mask: Tensor
    positions: Tensor
    cache: Any
    reserve: int  # answer tokens the merged cache keeps room for
    fed: int = 0
    projections: list[Tensor] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])
