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
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from personaxis.activations import pad_batch
from personaxis.generation import answer_generator, buffer_cache_layer_class, forward_kwargs, sample_tokens
from personaxis.guard import GuardPlan, GuardSwitch, guard_switch
from personaxis.hooks import residual_hooks
from personaxis.interventions import Operator, RowInterventions
from personaxis.models import LoadedModel
from personaxis.web.prefix_cache import PrefixCache
from personaxis.web.stream import StreamSettings, TextTracker, TokenStep

Interventions = dict[int, list[Operator]]

# Rows that ended stay in the batch (computing nothing anyone reads) until this fraction of it has ended or a new
# request joins: dropping rows copies the whole cache, about the cost of a few decode steps.
COMPACT_FRACTION = 1 / 8


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


class _Row:
    def __init__(self, job: Job, tokenizer: Any) -> None:
        self.job = job
        self.tracker = TextTracker(tokenizer, job.settings.stop)
        seed = job.settings.seed
        # The random stream of `stream_answer` and of the first answer of `generate` with this seed.
        self.generator = answer_generator(int(seed), 0) if seed is not None else None
        self.projections: list[float] = []
        self.prompt_projections: list[float] = []
        self.pending = 0  # the token the next step feeds
        self.delta = ""  # text that became final with the pending token
        self.capped = job.guard is None and bool(job.interventions) and _has_cap(job.interventions)
        self.guard_on = False
        self.capped_tokens = 0
        self.switches = 0
        self.done = False

    def interventions(self) -> Interventions:
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
        return sum(self.projections) / len(self.projections) if self.projections else None

    @property
    def remaining(self) -> int:
        return self.job.settings.max_new_tokens - len(self.tracker.ids)


def _has_cap(interventions: Interventions) -> bool:
    from personaxis.interventions import FloorCap

    return any(isinstance(op, FloorCap) for ops in interventions.values() for op in ops)


@dataclass
class _Prefill:
    """Requests being prefilled together: their left-padded prompts, their own cache, the positions fed so far and
    the projections read at them."""

    rows: list[_Row]
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


def kv_bytes_per_token(lm: LoadedModel) -> int:
    cfg = lm.model.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text, "num_hidden_layers", None) or lm.profile.n_layers
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or lm.profile.hidden_size // max(1, heads)
    element = torch.finfo(lm.model.dtype).bits // 8 if lm.model.dtype.is_floating_point else 4
    return int(n_layers * 2 * kv_heads * head_dim * element)


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
        self.bytes_per_token = kv_bytes_per_token(lm)
        self.cache_kw, self.has_logits_to_keep = forward_kwargs(lm.model)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.buffered = self._supports_buffer_cache()
        self.prefixes = PrefixCache()
        self.table = RowInterventions()
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Tensor | None = None
        self._prefill: _Prefill | None = None
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
                        self._rows, self._cache, self._mask = [], None, None
            except Exception as exc:  # a failed forward ends every row in it; the server keeps serving
                group = self._prefill.rows if self._prefill is not None else []
                for row in [*self._rows, *group]:
                    if not row.done:
                        row.done = True
                        row.job.emit(RowError(500, f"generation failed: {type(exc).__name__}: {exc}"))
                self._rows, self._cache, self._mask, self._prefill = [], None, None, None
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
        width = self._mask.shape[1] if self._mask is not None and live else 0
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
    def _supports_buffer_cache(self) -> bool:
        try:
            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer

            layers = DynamicCache(config=self.lm.model.config).layers
            return len(layers) > 0 and all(type(layer) is DynamicLayer for layer in layers)
        except Exception:  # pragma: no cover - other transformers versions
            return False

    def _new_cache(self, reserve: int) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.model.config)
        if self.buffered:
            layer_class = buffer_cache_layer_class()
            cache.layers = [layer_class(reserve) for _ in cache.layers]
        return cache

    def _forward(
        self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, rows: list[_Row], read: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Logits of the last position, and the projection of every position at the monitored layer."""
        self.table.set_rows([r.interventions() for r in rows])
        seen: dict[str, Tensor] = {}

        def reader(hidden: Tensor, _mask: Tensor | None) -> None:
            seen["projection"] = hidden.to(torch.float32) @ self.unit

        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self.cache_kw: cache,
            "use_cache": True,
        }
        if self.has_logits_to_keep:
            width = ids.shape[1]
            kwargs["logits_to_keep"] = 1 if width == 1 else torch.tensor([width - 1], device=ids.device)
        with residual_hooks(self.lm, writers=self.table.writers(), readers={self.layer: [reader]} if read else None):
            logits = self.lm.model(**kwargs).logits[:, -1, :]
        return logits, seen.get("projection")

    def _begin_prefill(self, jobs: list[Job]) -> _Prefill:
        rows = [_Row(job, self.lm.tokenizer) for job in jobs]
        ids, mask, positions, _ = pad_batch([j.prompt for j in jobs], self.pad_id, side="left", device=self.lm.device)
        live_remaining = max((r.remaining for r in self._rows if not r.done), default=0)
        reserve = max(live_remaining, *(j.settings.max_new_tokens for j in jobs)) + 1
        prefill = _Prefill(rows, ids, mask, positions, None, reserve)
        hit = None
        if self.buffered and self.config.prefix_cache:
            hit = self.prefixes.lookup([j.prompt for j in jobs], [j.interventions for j in jobs])
        if hit is not None:  # start after the prompt start these requests share with one read before
            cache = self._new_cache(0)
            cache.layers, prefill.fed, projections = self.prefixes.start(
                *hit, [len(j.prompt) for j in jobs], prefill.width, reserve, buffer_cache_layer_class()
            )
            prefill.cache = cache
            prefill.projections.append(projections)
        return prefill

    def _chunk_width(self, prefill: _Prefill) -> int:
        """Positions the next prefill pass feeds: all that are left when no other row waits on it."""
        left = prefill.width - prefill.fed
        if not self.config.prefill_chunk or not any(not r.done for r in self._rows):
            return left
        return min(left, max(1, self.config.prefill_chunk // len(prefill.rows)))

    def _prefill_chunk(self, prefill: _Prefill) -> None:
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
            prefill.cache = self._new_cache(prefill.width - n + prefill.reserve)
        logits, projection = self._forward(
            prefill.ids[:, start:stop],
            prefill.mask[:, :stop],
            prefill.positions[:, start:stop],
            prefill.cache,
            prefill.rows,
        )
        assert projection is not None
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
        if self._cache is None or not self._rows:
            self._rows, self._cache, self._mask = prefill.rows, prefill.cache, prefill.mask
        else:
            self._merge(prefill.rows, prefill.cache, prefill.mask, prefill.reserve)
        offset = len(self._rows) - len(prefill.rows)
        self._choose(logits, [i for i in range(offset, len(self._rows)) if not self._rows[i].done], base=offset)

    def _merge(self, rows: list[_Row], cache: Any, mask: Tensor, reserve: int) -> None:
        assert self._mask is not None
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(m: Tensor) -> Tensor:
            return torch.nn.functional.pad(m, (width - m.shape[1], 0), value=0)

        layer_class = buffer_cache_layer_class()
        self._cache.layers = [
            layer_class.concat(a, b, reserve) for a, b in zip(self._cache.layers, cache.layers, strict=True)
        ]
        self._mask = torch.cat([pad(self._mask), pad(mask)])
        self._rows = self._rows + rows

    def _drop_ended(self, *, force: bool) -> None:
        for row in self._rows:
            if not row.done and row.job.cancel.is_set():
                row.done = True
                self.counters.cancelled += 1
        ended = sum(r.done for r in self._rows)
        if not ended:
            return
        if ended == len(self._rows):
            self._rows, self._cache, self._mask = [], None, None
            return
        if not force and ended < max(1, math.ceil(len(self._rows) * COMPACT_FRACTION)):
            return
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        assert self._mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0 and self.buffered:
            for layer in self._cache.layers:
                layer.trim_left(start)
            self._mask = self._mask[:, start:]

    def _step(self) -> None:
        assert self._mask is not None
        rows = self._rows
        ones = self._mask.new_ones((len(rows), 1))
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = (self._mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
        tokens = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.lm.device)
        capped = [r.capped or r.guard_on for r in rows]
        logits, projection = self._forward(tokens, self._mask, positions, self._cache, rows)
        assert projection is not None
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
            row.projections.append(values[i])
            self.counters.tokens += 1
            if capped[i]:
                row.capped_tokens += 1
                self.counters.capped_tokens += 1
            row.job.emit(TokenStep(row.delta, len(row.tracker.ids), row.running()))
            self._guard(row)
            if row.tracker.hit_stop:
                self._finish(row, stopped=True)
            elif row.remaining <= 0:
                self._finish(row, stopped=False)
            elif now > row.deadline:
                row.done = True
                self.counters.timed_out += 1
                row.job.emit(RowError(504, f"the request timed out after {len(row.tracker.ids)} tokens"))
            else:
                going.append(i)
        if going:
            self._choose(logits, going)

    def _guard(self, row: _Row) -> None:
        plan = row.job.guard
        switch = guard_switch(plan, row.projections, row.guard_on) if plan is not None else None
        if switch is None:
            return
        row.guard_on = switch.on
        self.counters.alarms += switch.on
        row.switches += 1
        row.job.emit(GuardSwitch(switch.on, len(row.tracker.ids), switch.projection))

    def _choose(self, logits: Tensor, indices: list[int], base: int = 0) -> None:
        """The next token of each row in ``indices``: greedy rows in one argmax, sampled rows from their own
        generator (``sample_tokens``, as ``stream_answer`` and ``generate`` draw); row ``i`` reads
        ``logits[i - base]``."""
        greedy = logits.argmax(dim=-1).tolist()
        for i in indices:
            row = self._rows[i]
            settings = row.job.settings
            if settings.temperature > 0:
                uniform = torch.rand(1, generator=row.generator).to(logits.device)
                token = int(
                    sample_tokens(logits[i - base : i - base + 1], settings.temperature, settings.top_p, uniform)[0]
                )
            else:
                token = int(greedy[i - base])
            if token in self.stops:
                self._finish(row, stopped=True)
                continue
            row.pending = token
            row.delta = row.tracker.push(token)

    def _finish(self, row: _Row, *, stopped: bool) -> None:
        row.done = True
        tail = row.tracker.finish()
        if tail:
            row.job.emit(TokenStep(tail, len(row.tracker.ids), row.running()))
        self.counters.completed += 1
        row.job.emit(
            RowEnd(
                row.tracker.text,
                len(row.tracker.ids),
                stopped,
                row.running(),
                row.capped_tokens,
                row.switches,
                row.prompt_projections,
            )
        )

    def _kv_bytes(self) -> int:
        prefill, cache = self._prefill, self._cache  # read once: /metrics calls this from another thread
        joining = prefill.cache if prefill is not None else None
        return sum(self._cache_bytes(c) for c in (cache, joining) if c is not None)

    @staticmethod
    def _cache_bytes(cache: Any) -> int:
        total = 0
        for layer in cache.layers:
            for name in ("key_buffer", "value_buffer", "keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
                    if name == "value_buffer":
                        break
        return total

    def _note_peak(self) -> None:
        joining = sum(not r.done for r in self._prefill.rows) if self._prefill is not None else 0
        self.counters.peak_rows = max(self.counters.peak_rows, sum(not r.done for r in self._rows) + joining)
        self.counters.peak_kv_bytes = max(self.counters.peak_kv_bytes, self._kv_bytes())
