"""The one model behind the app: interventions per request, generation (whole or streamed) and per-turn projections.

Generation goes through the continuous batcher (:mod:`personaxis.web.batcher`): concurrent requests share decoding
steps, each with its own treatment. Every model call (a batcher step, a projection pass) holds ``ModelService.lock``
while it runs, so hooks of different calls never interleave on the shared model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch
from starlette.concurrency import run_in_threadpool

from personaxis.axis import Axis, AxisError
from personaxis.chat import (
    Conversation,
    ConversationError,
    normalize_conversation,
    render_chat,
    validate_conversation,
)
from personaxis.generation import stop_token_ids
from personaxis.interventions import CeilingCap, FloorCap, Operator, VectorError, merge_interventions
from personaxis.models import LoadedModel
from personaxis.web.batcher import (
    Batcher,
    BatcherConfig,
    GuardPlan,
    GuardSwitch,
    Job,
    QueueFull,
    RowEnd,
    RowError,
    RowItem,
    TooLarge,
)
from personaxis.web.errors import ApiError
from personaxis.web.stream import StreamSettings, TokenStep

T = TypeVar("T")
Interventions = dict[int, list[Operator]]


@dataclass(frozen=True)
class Treatment:
    """What is done to the model for one request: a capping experiment and a steering coefficient."""

    cap: str | None = None  # an experiment id, or "auto" (guard mode)
    alpha: float = 0.0
    interventions: Interventions = field(default_factory=dict)
    guard: GuardPlan | None = None  # guard mode: the capping switched on when the projection drifts

    def describe(self) -> dict[str, Any]:
        return {"cap": self.cap, "alpha": self.alpha}


class Prepared(NamedTuple):
    """A validated request: the conversation (``None`` for a plain-text prompt), its prompt token ids, and the
    ``[start, end)`` token positions of its earlier assistant turns in the prompt (``None``: no per-turn values)."""

    conversation: Conversation | None
    prompt: list[int]
    spans: list[tuple[int, int]] | None


def per_turn(prepared: Prepared, end: RowEnd) -> list[float | None]:
    """Per-turn projections from the passes that served the request: earlier turns from the prefill, the new answer
    its running mean (``None`` when empty)."""
    if prepared.spans is None:
        return []
    values = end.prompt_projections
    earlier: list[float | None] = [
        sum(values[a:b]) / (b - a) if b > a and b <= len(values) else None for a, b in prepared.spans
    ]
    return [*earlier, end.projection if end.text.strip() else None]


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool
    projections: list[float | None]  # every assistant turn of the conversation with the answer, at the monitored layer
    running_projection: float | None = None  # the mean over generated tokens, from the passes that fed them
    capped_tokens: int = 0  # tokens generated while a cap acted on the request
    switches: tuple[GuardSwitch, ...] = ()  # guard mode's switches, in order


@dataclass(frozen=True)
class StreamError:
    status: int
    message: str


StreamItem = TokenStep | GuardSwitch | Answer | StreamError
AUTO = "auto"  # the cap value that asks for guard mode


def _steering(axis: Axis, layer: int, alpha: float, *, raw: bool = False) -> Interventions:
    from personaxis.steering import steering_interventions

    return {k: list(v) for k, v in steering_interventions(axis, [layer], alpha, raw=raw).items()}


class ModelService:
    """One loaded model, its axis and optional capping config; ``cap``/``alpha`` are the server's defaults.

    α is a fraction of the layer's mean residual norm, or with ``raw_alpha`` the reference's coefficient of the
    stored axis row (as ``personaxis steer --raw``)."""

    def __init__(
        self,
        lm: LoadedModel,
        axis: Axis,
        capping: Any | None = None,
        *,
        layer: int | None = None,
        default_cap: str | None = None,
        default_alpha: float = 0.0,
        steer_layer: int | None = None,
        batcher: BatcherConfig | None = None,
        guard_experiment: str | None = None,
        guard_window: int = 8,
        guard_hysteresis: float | None = None,
        raw_alpha: bool = False,
    ) -> None:
        axis.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
        if capping is not None and hasattr(capping, "check_fits"):
            capping.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
        self.lm = lm
        self.axis = axis
        self.capping = capping
        self.layer = axis.target_layer if layer is None else layer
        self.steer_layer = self.layer if steer_layer is None else steer_layer
        axis.layer(self.layer)
        axis.layer(self.steer_layer)
        self.lock = threading.Lock()
        self.stop_ids = stop_token_ids(lm.tokenizer)
        self.default_cap = default_cap
        self.default_alpha = float(default_alpha)
        self.raw_alpha = raw_alpha
        if guard_window < 1:
            raise ValueError(f"the guard window must be at least 1 token, got {guard_window}")
        self.guard_window = guard_window
        self.guard_experiment = guard_experiment or self._default_guard_experiment()
        self.guard_hysteresis = guard_hysteresis
        self._treatments: dict[tuple[str | None, float], Treatment] = {}
        try:
            if guard_experiment is not None and guard_experiment not in self.experiment_ids:
                raise ApiError(400, f"unknown guard experiment {guard_experiment!r}")
            self.treatment(default_cap, default_alpha)  # fail early on a bad default
        except ApiError as exc:
            raise ValueError(exc.message) from None
        self.batcher = Batcher(
            lm, layer=self.layer, unit=axis.unit(self.layer), stop_ids=self.stop_ids, lock=self.lock, config=batcher
        )

    def _default_guard_experiment(self) -> str | None:
        """The server's default experiment if it caps, else the first experiment that caps the monitored layer,
        else the first one."""
        ids = self.experiment_ids
        if self.default_cap in ids:
            return self.default_cap
        for experiment in ids:
            if self.layer in {cv for cv in self.capping.interventions(experiment)}:
                return experiment
        return ids[0] if ids else None

    def guard_plan(self) -> GuardPlan:
        """Guard mode's capping and thresholds; a 400 when the server cannot guard (no calibrated threshold)."""
        experiment = self.guard_experiment
        if experiment is None:
            raise ApiError(400, "cap 'auto' (guard mode) needs a capping config: this server has none", param="cap")
        threshold = self.floor(experiment)
        if threshold is None:
            raise ApiError(
                400,
                f"cap 'auto' (guard mode) needs a calibrated threshold at layer {self.layer}; {experiment!r} has none",
                param="cap",
            )
        hysteresis = self.guard_hysteresis
        if hysteresis is None:  # 5 % of the layer's mean residual norm
            hysteresis = abs(float(self.axis.alpha_to_raw(self.layer, 0.05)))
        return GuardPlan(
            self.treatment(experiment, 0.0).interventions, float(threshold), self.guard_window, float(hysteresis)
        )

    # ------------------------------------------------------------------------------------------ capping info
    @property
    def experiment_ids(self) -> list[str]:
        return list(self.capping.experiment_ids) if self.capping is not None else []

    def experiment_layers(self, experiment: str) -> list[int]:
        return sorted(self.treatment(experiment, 0.0).interventions)

    def floor(self, experiment: str | None = None) -> float | None:
        """The calibrated floor at the monitored layer: for ``experiment``, the threshold of its percentile; else
        the 25th percentile; ``None`` when the config has no threshold there."""
        if self.capping is None:
            return None
        if experiment == AUTO:
            experiment = self.guard_experiment
        percentile = 25.0
        if experiment is not None:
            try:
                from personaxis.capping import parse_experiment_id

                parsed = parse_experiment_id(experiment)
                percentile = parsed[2] if parsed else percentile
            except ImportError:  # pragma: no cover
                pass
        floor_fn = getattr(self.capping, "floor", None)
        if floor_fn is not None:
            try:
                return float(floor_fn(self.layer, percentile))
            except (ValueError, TypeError, IndexError):
                pass
        if experiment is None:
            return None
        return self._floor_from_ops(self.treatment(experiment, 0.0).interventions)

    def _floor_from_ops(self, interventions: Interventions) -> float | None:
        """A floor at the monitored layer read off the caps themselves (a floor along +axis or a ceiling along −axis)."""
        unit = self.axis.unit(self.layer)
        for op in interventions.get(self.layer, []):
            if isinstance(op, FloorCap):
                cos = float(op.unit @ unit)
                if isinstance(op, CeilingCap) and cos < -0.999:
                    return -op.tau
                if not isinstance(op, CeilingCap) and cos > 0.999:
                    return op.tau
        return None

    # -------------------------------------------------------------------------------------------- treatment
    def treatment(self, cap: str | None, alpha: float | None) -> Treatment:
        """Interventions for a request; unknown experiments and bad coefficients are 400 errors."""
        alpha = 0.0 if alpha is None else float(alpha)
        if not alpha == alpha or abs(alpha) > 10:
            raise ApiError(400, f"alpha must be a finite number between -10 and 10, got {alpha}", param="alpha")
        key = (cap, alpha)
        if key not in self._treatments:  # one set of operators per treatment: rows that share it share the work
            if len(self._treatments) >= 256:
                self._treatments.clear()
            self._treatments[key] = self._new_treatment(cap, alpha)
        return self._treatments[key]

    def _new_treatment(self, cap: str | None, alpha: float) -> Treatment:
        if cap == AUTO:
            steering = self._new_treatment(None, alpha)
            return Treatment(AUTO, alpha, steering.interventions, self.guard_plan())
        parts: list[Interventions] = []
        if cap is not None:
            if self.capping is None:
                raise ApiError(
                    400, f"unknown capping experiment {cap!r}: this server has no capping config", param="cap"
                )
            if cap not in self.experiment_ids:
                shown = ", ".join(self.experiment_ids[:12])
                raise ApiError(400, f"unknown capping experiment {cap!r}; known: {shown}", param="cap")
            parts.append({k: list(v) for k, v in self.capping.interventions(cap).items()})
        if alpha != 0.0:
            try:
                parts.append(_steering(self.axis, self.steer_layer, alpha, raw=self.raw_alpha))
            except (AxisError, VectorError) as exc:
                raise ApiError(400, f"cannot steer: {exc}", param="alpha") from None
        return Treatment(cap, alpha, merge_interventions(*parts))

    # ------------------------------------------------------------------------------------------- model calls
    def prepare_prompt(self, messages: Sequence[Any], max_new_tokens: int) -> Prepared:
        """Validate a conversation and render it as the prompt of the next assistant answer.

        Not locked: a caller that shares the service with running requests holds :attr:`lock` around it (the
        tokenizer is shared state), as the app's request path does.

        Args:
            messages: ``{"role", "content"}`` messages ending with a user message.
            max_new_tokens: the answer's token budget, checked with the prompt against the model's context.

        Returns:
            The :class:`Prepared` request: the validated conversation, the prompt token ids (with the generation
            prompt), and the token spans of its earlier assistant turns.

        Raises:
            ApiError: 422 when the conversation is malformed, does not end with a user message, or with
                ``max_new_tokens`` exceeds the model's context.
        """
        try:
            conversation = validate_conversation(messages)
            normalized = normalize_conversation(conversation, self.lm.profile)
            if normalized[-1]["role"] != "user":
                raise ConversationError("a prompt to generate from must end with a user message")
            chat = render_chat(self.lm.tokenizer, normalized, self.lm.profile, add_generation_prompt=True)
        except ConversationError as exc:
            raise ApiError(422, str(exc), param="messages") from None
        prompt = chat.input_ids
        limit = self.lm.profile.max_context
        if limit and len(prompt) + max_new_tokens > limit:
            raise ApiError(
                422,
                f"the conversation has {len(prompt)} tokens: with {max_new_tokens} new tokens it exceeds "
                f"the model's context of {limit}",
                param="messages",
            )
        return Prepared(conversation, prompt, [(span.start, span.end) for span in chat.spans])

    def _projections(self, conversation: Conversation, interventions: Interventions) -> list[float | None]:
        if not any(m["role"] == "assistant" for m in conversation):
            return []
        from personaxis.monitor import monitor_conversation

        rows = monitor_conversation(self.lm, self.axis, conversation, layers=[self.layer], interventions=interventions)
        return [row.projections[self.layer] for row in rows]

    def project_locked(self, conversation: Conversation, treatment: Treatment) -> list[float | None]:
        with self.lock, torch.inference_mode():
            return self._projections(conversation, treatment.interventions)

    def project_many_locked(self, conversations: Sequence[Conversation], treatment: Treatment) -> list[list[Any]]:
        """Per-turn rows (``TurnProjection``) for several conversations in one batched pass."""
        from personaxis.monitor import Transcript, monitor_transcripts

        transcripts = [Transcript(name=str(i), conversation=c) for i, c in enumerate(conversations)]
        with self.lock, torch.inference_mode():
            rows = monitor_transcripts(
                self.lm, self.axis, transcripts, layers=[self.layer], interventions=treatment.interventions
            )
        grouped: list[list[Any]] = [[] for _ in conversations]
        for row in rows:
            grouped[int(row.transcript)].append(row)
        return grouped

    def _with_answer(self, conversation: Conversation, text: str, treatment: Treatment) -> list[float | None]:
        """Projections of every assistant turn, the new answer last (``None`` where it cannot be measured: an empty
        answer has no tokens to average)."""
        earlier = sum(1 for m in conversation if m["role"] == "assistant")
        try:
            if text.strip():
                return self._projections(
                    [*conversation, {"role": "assistant", "content": text}], treatment.interventions
                )
            return [*self._projections(conversation, treatment.interventions), None]
        except ValueError:  # ConversationError, MonitorError: a template that rewrote the answer, …
            return [None] * (earlier + 1)

    # ------------------------------------------------------------------------------------------ generation
    async def open_stream(
        self, prepared: Prepared, treatment: Treatment, settings: StreamSettings, *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamItem]:
        """Queue the request for the batcher now (a full queue is a 429, a conversation over the cache budget a
        413, before any response starts) and return its items: token steps and guard switches, then the complete
        :class:`Answer` (or a :class:`StreamError`). Leaving the iterator early (client gone) frees the row."""
        prompt = prepared.prompt
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RowItem] = asyncio.Queue()

        def emit(item: RowItem) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                job.cancel.set()

        job = Job(list(prompt), settings, treatment.interventions, emit, guard=treatment.guard, timeout_s=timeout_s)
        try:
            self.batcher.submit(job)
        except QueueFull as exc:
            raise ApiError(
                429, f"{exc}; retry in {exc.retry_after} s", headers={"Retry-After": str(exc.retry_after)}
            ) from None
        except TooLarge as exc:
            raise ApiError(413, str(exc), param="messages") from None
        return self._items(prepared, job, queue)

    async def _items(self, prepared: Prepared, job: Job, queue: asyncio.Queue[RowItem]) -> AsyncIterator[StreamItem]:
        switches: list[GuardSwitch] = []
        try:
            while True:
                item = await queue.get()
                if isinstance(item, RowError):
                    yield StreamError(item.status, item.message)
                    return
                if isinstance(item, RowEnd):
                    yield Answer(
                        item.text,
                        len(prepared.prompt),
                        item.new_tokens,
                        item.stopped,
                        per_turn(prepared, item),
                        item.projection,
                        item.capped_tokens,
                        tuple(switches),
                    )
                    return
                if isinstance(item, GuardSwitch):
                    switches.append(item)
                yield item
        finally:
            job.cancel.set()
            self.batcher.wake()

    def teacher_forced_projections(
        self, conversation: Conversation, text: str, treatment: Treatment
    ) -> list[float | None]:
        """Per-turn projections of the conversation with ``text`` as the answer, from a separate teacher-forced pass
        (the server answers from the passes that generated it instead; this is the check)."""
        with self.lock, torch.inference_mode():
            return self._with_answer(conversation, text, treatment)

    async def answer(self, messages: Sequence[Any], treatment: Treatment, settings: StreamSettings) -> Answer:
        prepared = await self.prepare(messages, settings.max_new_tokens)
        async for item in await self.open_stream(prepared, treatment, settings):
            if isinstance(item, Answer):
                return item
            if isinstance(item, StreamError):
                raise ApiError(item.status, item.message)
        raise ApiError(500, "generation ended without an answer")  # pragma: no cover - the batcher always ends rows

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(fn, *args)

    def _prepare_locked(self, messages: Sequence[Any], max_new_tokens: int) -> Prepared:
        with self.lock:  # the tokenizer is shared state too
            prepared = self.prepare_prompt(messages, max_new_tokens)
        try:
            self.batcher.check_fits(len(prepared.prompt), max_new_tokens)
        except TooLarge as exc:
            raise ApiError(413, str(exc), param="messages") from None
        return prepared

    def _prepare_text_locked(self, text: str, max_new_tokens: int) -> Prepared:
        with self.lock:
            prompt = list(self.lm.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not prompt:
            raise ApiError(422, "prompt: empty after tokenisation", param="prompt")
        limit = self.lm.profile.max_context
        if limit and len(prompt) + max_new_tokens > limit:
            raise ApiError(
                422,
                f"the prompt has {len(prompt)} tokens: with {max_new_tokens} new tokens it exceeds "
                f"the model's context of {limit}",
                param="prompt",
            )
        try:
            self.batcher.check_fits(len(prompt), max_new_tokens)
        except TooLarge as exc:
            raise ApiError(413, str(exc), param="prompt") from None
        return Prepared(None, prompt, None)

    async def prepare_text(self, text: str, max_new_tokens: int) -> Prepared:
        """A plain-text prompt (``/v1/completions``): no chat template, so no per-turn projections."""
        return await run_in_threadpool(self._prepare_text_locked, text, max_new_tokens)

    async def prepare(self, messages: Sequence[Any], max_new_tokens: int) -> Prepared:
        """Validate and tokenise before a stream starts, so that bad requests get a plain 4xx, not a broken stream."""
        return await run_in_threadpool(self._prepare_locked, messages, max_new_tokens)

    def close(self) -> None:
        self.batcher.close()
