"""The state the server's batcher keeps per request: a :class:`BatchRow` (its text so far, random stream,
projections, guard state) and a :class:`JoiningGroup` (requests whose prompts are being prefilled together, before
they join the running batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from personaxis.generation import answer_generator, sample_tokens
from personaxis.guard import GuardSwitch, guard_switch
from personaxis.interventions import FloorCap
from personaxis.web.jobs import Counters, Interventions, Job, RowEnd
from personaxis.web.stream import TextTracker, TokenStep


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

    def next_token(self, logits: Tensor, greedy: int) -> int:
        """The row's next token from its logits ``[1, vocabulary]``: ``greedy`` (the argmax) without a temperature,
        else drawn from the row's own generator (``sample_tokens``, as ``generate`` draws)."""
        settings = self.job.settings
        if settings.temperature <= 0:
            return greedy
        uniform = torch.rand(1, generator=self.generator).to(logits.device)
        return int(sample_tokens(logits, settings.temperature, settings.top_p, uniform)[0])

    def push(self, token: int) -> None:
        """Make ``token`` the one the next step feeds."""
        self.pending = token
        self.delta = self.tracker.push(token)

    def fed(self, projection: float, capped: bool, counters: Counters) -> None:
        """The pending token was fed, with ``projection`` at the monitored layer (``capped``: a cap acted on it):
        emit its text, then switch the guard if its rule says so."""
        self.projections.append(projection)
        counters.tokens += 1
        if capped:
            self.capped_tokens += 1
            counters.capped_tokens += 1
        self.job.emit(TokenStep(self.delta, len(self.tracker.ids), self.running()))
        plan = self.job.guard
        switch = guard_switch(plan, self.projections, self.guard_on) if plan is not None else None
        if switch is None:
            return
        self.guard_on = switch.on
        counters.alarms += switch.on
        self.switches += 1
        self.job.emit(GuardSwitch(switch.on, len(self.tracker.ids), switch.projection))

    def finish(self, counters: Counters, *, stopped: bool) -> None:
        """End the row: emit the text held back for a stop string, then its :class:`RowEnd`."""
        self.done = True
        tail = self.tracker.finish()
        if tail:
            self.job.emit(TokenStep(tail, len(self.tracker.ids), self.running()))
        counters.completed += 1
        self.job.emit(
            RowEnd(
                self.tracker.text,
                len(self.tracker.ids),
                stopped,
                self.running(),
                self.capped_tokens,
                self.switches,
                self.prompt_projections,
            )
        )


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
