"""What the server's batcher takes and gives: a :class:`Job` (one request), the items of its stream (tokens, guard
switches, then a :class:`RowEnd` or a :class:`RowError`), the refusals (:class:`QueueFull`, :class:`TooLarge`), the
batcher's settings and its counters. The scheduler itself is :mod:`personaxis.web.batcher`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from personaxis.guard import GuardPlan, GuardSwitch
from personaxis.interventions import Operator
from personaxis.web.stream import StreamSettings, TokenStep

Interventions = dict[int, list[Operator]]


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 32  # rows decoded side by side (1: one request at a time, the server before batching)
    max_queue: int = 64  # requests waiting for a row; more are refused with 429
    kv_budget_bytes: int = 1024**3  # key/value cache of the running batch
    timeout_s: float = 300.0  # a request not finished by then ends with a 504
    retry_after_s: int = 2  # the Retry-After of a 429
    prefill_chunk: int = 256  # prompt tokens (rows × positions) fed between two decoding steps; 0: whole prompts
    prefix_cache: bool = True  # start prompts from the positions of a shared start read before

    def __post_init__(self) -> None:
        if (
            self.max_batch < 1
            or self.max_queue < 0
            or self.kv_budget_bytes < 1
            or not self.timeout_s > 0
            or self.prefill_chunk < 0
        ):
            raise ValueError(f"bad batcher settings: {self}")


@dataclass(frozen=True)
class RowEnd:
    text: str
    new_tokens: int
    stopped: bool  # an end-of-turn token or a stop string (False: cut at max_new_tokens)
    projection: float | None  # running mean over the answer's tokens, from the passes that fed them
    capped_tokens: int  # tokens fed while a cap acted on the row
    switches: int  # guard switches
    prompt_projections: list[float] = field(default_factory=list)  # every prompt position, from the prefill pass


@dataclass(frozen=True)
class RowError:
    status: int
    message: str


RowItem = TokenStep | GuardSwitch | RowEnd | RowError


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


class TooLarge(Exception):
    """A request whose cache alone would exceed the budget."""


@dataclass
class Counters:
    requests: int = 0  # admitted to the queue
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0  # 429
    tokens: int = 0  # new tokens generated
    alarms: int = 0  # guard switched capping on
    capped_tokens: int = 0  # tokens fed with a cap acting on their row
    steps: int = 0  # decode steps
    prefill_passes: int = 0  # forward passes over joining prompts (a prompt prefilled in chunks takes several)
    peak_rows: int = 0
    peak_kv_bytes: int = 0


@dataclass
class Job:
    """One request: what to generate, how to treat it, and where its items go (``emit`` is called from the
    scheduler thread)."""

    prompt: list[int]
    settings: StreamSettings
    interventions: Interventions
    emit: Callable[[RowItem], None]
    guard: GuardPlan | None = None
    timeout_s: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = 0.0  # set by the batcher (time.monotonic)
