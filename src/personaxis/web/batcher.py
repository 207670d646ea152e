"""Continuous batching for the server: concurrent requests share decoding steps, each row with its own treatment.

One scheduler thread owns the decode loop. A request joins the running batch at the next step (its prompt prefilled
and its key/value cache stacked onto the batch's, left-padded), takes one token per step, and leaves when it ends
(an end-of-turn token, a stop string, ``max_new_tokens``, a cancelled client, its deadline). Requests that arrive
together are prefilled together; while other rows are decoding, that prefill runs in chunks of at most
``prefill_chunk`` tokens, one chunk between two decoding steps, so that a long prompt joining does not stall the
running answers for its whole prefill. A prompt start read before with the same treatment (the chat template's
system turn) is not read again (:mod:`personaxis.web.prefix_cache`). Every row keeps its own
interventions inside the one forward pass (:class:`personaxis.interventions.RowInterventions`, through the one hook
mechanism of :mod:`personaxis.hooks`), and a reader at the monitored layer gives each token's projection from the
same pass that fed it: the running projection costs no second pass.

Guard mode (``cap: "auto"``): a row's capping switches on when the mean projection of its last ``window`` tokens
falls below the calibrated threshold and off again once that mean rises above ``threshold + hysteresis``; each
switch is an item of the row's stream and is counted.

Limits: at most ``max_batch`` rows; at most ``max_queue`` requests waiting (more: :class:`QueueFull`, a 429); the
batch's key/value cache within ``kv_budget_bytes`` (rows × (longest context + longest answer still to come) × bytes
per token; while a new row is stacked on, the old and new caches exist together for a moment); every request
finished by its deadline. The model is only ever called under ``lock`` (shared with the app's other model calls).

Requests and their items are in :mod:`personaxis.web.jobs`, each row's state in :mod:`personaxis.web.batch_rows`; the
decode step (model call with the cache, mask and positions, dropping and stacking rows) is the fast engine's,
:mod:`personaxis.generation.decode`, and the cache is changed only through :mod:`personaxis.generation.cache`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from personaxis.activations import pad_batch
from personaxis.generation import cache as kv
from personaxis.generation.decode import CachedForward, DecodeBatch
from personaxis.generation.sampling import greedy_tokens, pad_token_id
from personaxis.guard import GuardPlan, GuardSwitch
from personaxis.hooks import residual_hooks
from personaxis.interventions import RowInterventions
from personaxis.models import LoadedModel
from personaxis.web.batch_rows import BatchRow, JoiningGroup
from personaxis.web.jobs import (
    BatcherConfig,
    Counters,
    Interventions,
    Job,
    QueueFull,
    RowEnd,
    RowError,
    RowItem,
    TooLarge,
)
from personaxis.web.prefix_cache import PrefixCache

__all__ = [
    "Batcher",
    "BatcherConfig",
    "Counters",
    "GuardPlan",
    "GuardSwitch",
    "Interventions",
    "Job",
    "QueueFull",
    "RowEnd",
    "RowError",
    "RowItem",
    "TooLarge",
]

# Rows that ended stay in the batch (computing nothing anyone reads) until this fraction of it has ended or a new
# request joins: dropping rows copies the whole cache, about the cost of a few decode steps.
COMPACT_FRACTION = 1 / 8


class Batcher:
    """The scheduler: ``submit`` a :class:`Job`; its items arrive through ``job.emit``, the last one a
    :class:`RowEnd` or :class:`RowError` (none after ``job.cancel`` is set)."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        layer: int,
        unit: Tensor,
        stop_ids: Sequence[int],
        lock: threading.Lock,
        config: BatcherConfig | None = None,
    ) -> None:
        self.lm = lm
        self.config = config or BatcherConfig()
        self.layer = layer
        self.unit = unit.to(device=lm.device, dtype=torch.float32)
        self.stops = {int(s) for s in stop_ids}
        self.lock = lock
        self.counters = Counters()
        self.bytes_per_token = kv.kv_bytes_per_token(lm)
        self.forward = CachedForward.of(lm.model)
        self.pad_id = pad_token_id(lm.tokenizer)
        self.buffered = kv.supports_buffer_cache(lm.model)
        self.prefixes = PrefixCache()
        self.table = RowInterventions()
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._rows: list[BatchRow] = []  # the rows of ``_batch``, in its order
        self._batch: DecodeBatch | None = None
        self._prefill: JoiningGroup | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ interface
    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        need = (prompt_tokens + max_new_tokens) * self.bytes_per_token
        if need > self.config.kv_budget_bytes:
            raise TooLarge(
                f"the conversation ({prompt_tokens} tokens) with {max_new_tokens} new tokens needs "
                f"{need} bytes of key/value cache, more than this server's budget of "
                f"{self.config.kv_budget_bytes}"
            )

    def submit(self, job: Job) -> None:
        self.check_fits(len(job.prompt), job.settings.max_new_tokens)
        with self._cv:
            if len(self._waiting) >= self.config.max_queue:
                self.counters.rejected += 1
                raise QueueFull(self.config.retry_after_s)
            self.counters.requests += 1
            job.deadline = time.monotonic() + min(job.timeout_s or self.config.timeout_s, self.config.timeout_s)
            self._waiting.append(job)
            self._start()
            self._cv.notify()

    def wake(self) -> None:
        """Let the scheduler see a cancelled request now (a client that left)."""
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def snapshot(self) -> dict[str, Any]:
        with self._cv:
            return {
                **vars(self.counters),
                "queue": len(self._waiting),
                "rows": sum(not r.done for r in self._rows),
                "kv_bytes": self._kv_bytes(),
                "kv_budget_bytes": self.config.kv_budget_bytes,
                "prefix_hits": self.prefixes.hits,
                "prefix_tokens": self.prefixes.tokens_reused,
                "max_batch": self.config.max_batch,
            }

    # ------------------------------------------------------------------------------------------------ the loop
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="personaxis-batcher", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._busy():
                    self._cv.wait()
                if self._closed:
                    for job in self._waiting:
                        job.emit(RowError(503, "the server is shutting down"))
                    self._waiting.clear()
                    return
                self._expire_waiting()
                admit = self._admissible() if self._prefill is None else []
            try:
                with self.lock, torch.inference_mode():
                    self._drop_ended(force=False)
                    if admit:
                        self._prefill = self._begin_prefill(admit)
                    if self._prefill is not None:
                        self._prefill_chunk(self._prefill)
                    if any(not r.done for r in self._rows):
                        self._step()
                    self._note_peak()
                    if not any(not r.done for r in self._rows):  # idle: hold no cache
                        self._rows, self._batch = [], None
            except Exception as exc:  # a failed forward ends every row in it; the server keeps serving
                group = self._prefill.rows if self._prefill is not None else []
                for row in [*self._rows, *group]:
                    if not row.done:
                        row.done = True
                        row.job.emit(RowError(500, f"generation failed: {type(exc).__name__}: {exc}"))
                self._rows, self._batch, self._prefill = [], None, None
            time.sleep(0)  # let a thread waiting for the model lock (a tokeniser call, a projection) take its turn

    def _busy(self) -> bool:
        return self._prefill is not None or any(not r.done for r in self._rows)

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        kept: deque[Job] = deque()
        for job in self._waiting:
            if job.cancel.is_set():
                self.counters.cancelled += 1
            elif now > job.deadline:
                self.counters.timed_out += 1
                job.emit(RowError(504, "the request timed out while waiting for a free row"))
            else:
                kept.append(job)
        self._waiting = kept

    def _admissible(self) -> list[Job]:
        """Waiting jobs that fit now (rows and cache budget), in arrival order."""
        live = [r for r in self._rows if not r.done]
        if not self.buffered and live:
            return []  # caches that cannot take new rows: wait until the batch is empty
        width = self._batch.width if self._batch is not None and live else 0
        remaining = max((r.remaining for r in live), default=0)
        n = len(live)
        taken: list[Job] = []
        while self._waiting and n + len(taken) < self.config.max_batch:
            job = self._waiting[0]
            new_width = max(width, len(job.prompt))
            new_remaining = max(remaining, job.settings.max_new_tokens)
            need = (n + len(taken) + 1) * (new_width + new_remaining) * self.bytes_per_token
            if need > self.config.kv_budget_bytes and (n or taken):
                break
            taken.append(self._waiting.popleft())
            width, remaining = new_width, new_remaining
        return taken

    # ------------------------------------------------------------------------------------------------ model calls
    def _forward(
        self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, rows: list[BatchRow]
    ) -> tuple[Tensor, Tensor]:
        """Logits of the last position, and the projection of every position at the monitored layer."""
        self.table.set_rows([r.interventions() for r in rows])
        seen: dict[str, Tensor] = {}

        def reader(hidden: Tensor, _mask: Tensor | None) -> None:
            seen["projection"] = hidden.to(torch.float32) @ self.unit

        with residual_hooks(self.lm, writers=self.table.writers(), readers={self.layer: [reader]}):
            logits = self.forward.logits(ids, mask, positions, cache)
        return logits, seen["projection"]

    def _begin_prefill(self, jobs: list[Job]) -> JoiningGroup:
        rows = [BatchRow(job, self.lm.tokenizer) for job in jobs]
        ids, mask, positions, _ = pad_batch([j.prompt for j in jobs], self.pad_id, side="left", device=self.lm.device)
        live_remaining = max((r.remaining for r in self._rows if not r.done), default=0)
        reserve = max(live_remaining, *(j.settings.max_new_tokens for j in jobs)) + 1
        prefill = JoiningGroup(rows, ids, mask, positions, None, reserve)
        hit = None
        if self.buffered and self.config.prefix_cache:
            hit = self.prefixes.lookup([j.prompt for j in jobs], [j.interventions for j in jobs])
        if hit is not None:  # start after the prompt start these requests share with one read before
            keys, values, prefill.fed, projections = self.prefixes.start(
                *hit, [len(j.prompt) for j in jobs], prefill.width
            )
            prefill.cache = kv.from_tensors(self.lm.model, keys, values, prefill.width - prefill.fed + reserve)
            prefill.projections.append(projections)
        return prefill

    def _chunk_width(self, prefill: JoiningGroup) -> int:
        """Positions the next prefill pass feeds: all that are left when no other row waits on it."""
        left = prefill.width - prefill.fed
        if not self.config.prefill_chunk or not any(not r.done for r in self._rows):
            return left
        return min(left, max(1, self.config.prefill_chunk // len(prefill.rows)))

    def _prefill_chunk(self, prefill: JoiningGroup) -> None:
        """Feed the next chunk of the joining prompts; once they are all fed, stack the rows onto the batch and
        choose their first tokens. A joining request cancelled or past its deadline meanwhile ends here."""
        now = time.monotonic()
        for row in prefill.rows:
            if row.done:
                continue
            if row.job.cancel.is_set():
                row.done = True
                self.counters.cancelled += 1
            elif now > row.deadline:
                row.done = True
                self.counters.timed_out += 1
                row.job.emit(RowError(504, "the request timed out while its prompt was read"))
        if all(r.done for r in prefill.rows):
            self._prefill = None
            return
        n = self._chunk_width(prefill)
        start, stop = prefill.fed, prefill.fed + n
        if prefill.cache is None:  # room for the whole prompt and the answers from the first chunk on
            reserve = prefill.width - n + prefill.reserve
            prefill.cache = kv.new_cache(self.lm.model, reserve if self.buffered else None)
        logits, projection = self._forward(
            prefill.ids[:, start:stop],
            prefill.mask[:, :stop],
            prefill.positions[:, start:stop],
            prefill.cache,
            prefill.rows,
        )
        self.counters.prefill_passes += 1
        prefill.projections.append(projection)
        prefill.fed = stop
        if stop < prefill.width:
            return
        self._prefill = None
        values = torch.cat(prefill.projections, dim=1).tolist()
        for row, row_values in zip(prefill.rows, values, strict=True):
            row.prompt_projections = row_values[prefill.width - len(row.job.prompt) :]
        if self.buffered and self.config.prefix_cache:
            first = prefill.rows[0]
            self.prefixes.store(first.job.prompt, first.job.interventions, prefill.cache, 0, first.prompt_projections)
        self._drop_ended(force=True)
        joining = DecodeBatch(prefill.cache, prefill.mask, buffered=self.buffered)
        if self._batch is None or not self._rows:
            self._rows, self._batch = prefill.rows, joining
        else:
            self._batch.stack([joining], prefill.reserve)
            self._rows = self._rows + prefill.rows
        offset = len(self._rows) - len(prefill.rows)
        self._choose(logits, [i for i in range(offset, len(self._rows)) if not self._rows[i].done], base=offset)

    def _drop_ended(self, *, force: bool) -> None:
        for row in self._rows:
            if not row.done and row.job.cancel.is_set():
                row.done = True
                self.counters.cancelled += 1
        ended = sum(r.done for r in self._rows)
        if not ended:
            return
        if ended == len(self._rows):
            self._rows, self._batch = [], None
            return
        if not force and ended < max(1, math.ceil(len(self._rows) * COMPACT_FRACTION)):
            return
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        assert self._batch is not None
        self._batch.keep(torch.tensor(keep, dtype=torch.long, device=self._batch.mask.device))
        self._rows = [self._rows[i] for i in keep]

    def _step(self) -> None:
        batch = self._batch
        assert batch is not None
        rows = self._rows
        positions = batch.extend()
        tokens = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.lm.device)
        capped = [r.capped or r.guard_on for r in rows]
        logits, projection = self._forward(tokens, batch.mask, positions, batch.cache, rows)
        values = projection[:, -1].tolist()
        self.counters.steps += 1
        now = time.monotonic()
        going: list[int] = []
        for i, row in enumerate(rows):
            if row.done:
                continue
            if row.job.cancel.is_set():
                row.done = True
                self.counters.cancelled += 1
                continue
            row.fed(values[i], capped[i], self.counters)
            if row.tracker.hit_stop:
                row.finish(self.counters, stopped=True)
            elif row.remaining <= 0:
                row.finish(self.counters, stopped=False)
            elif now > row.deadline:
                row.done = True
                self.counters.timed_out += 1
                row.job.emit(RowError(504, f"the request timed out after {len(row.tracker.ids)} tokens"))
            else:
                going.append(i)
        if going:
            self._choose(logits, going)

    def _choose(self, logits: Tensor, indices: list[int], base: int = 0) -> None:
        """The next token of each row in ``indices`` (greedy rows in one argmax); row ``i`` reads
        ``logits[i - base]``."""
        greedy = greedy_tokens(logits).tolist()
        for i in indices:
            row = self._rows[i]
            token = row.next_token(logits[i - base : i - base + 1], int(greedy[i - base]))
            if token in self.stops:
                row.finish(self.counters, stopped=True)
            else:
                row.push(token)

    def _kv_bytes(self) -> int:
        prefill, batch = self._prefill, self._batch  # read once: /metrics calls this from another thread
        caches = (batch.cache if batch is not None else None, prefill.cache if prefill is not None else None)
        return sum(kv.cache_bytes(c) for c in caches if c is not None)

    def _note_peak(self) -> None:
        joining = sum(not r.done for r in self._prefill.rows) if self._prefill is not None else 0
        self.counters.peak_rows = max(self.counters.peak_rows, sum(not r.done for r in self._rows) + joining)
        self.counters.peak_kv_bytes = max(self.counters.peak_kv_bytes, self._kv_bytes())
