"""The one model behind the app: interventions per request, generation (whole or streamed) and per-turn projections,
all serialised by one lock.

Every model call runs in a worker thread that holds ``ModelService.lock`` for its whole duration (generation and the
projection pass that follows), so concurrent requests queue instead of interleaving hooks on the shared model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from starlette.concurrency import run_in_threadpool

from personaxis.axis import Axis, AxisError
from personaxis.chat import Conversation, ConversationError, render_prompt, validate_conversation
from personaxis.generation import SamplingConfig, generate, stop_token_ids
from personaxis.interventions import (
    CeilingCap,
    FloorCap,
    Operator,
    VectorError,
    apply_interventions,
    merge_interventions,
)
from personaxis.models import LoadedModel
from personaxis.web.errors import ApiError
from personaxis.web.stream import StreamEnd, StreamSettings, TokenStep, stream_answer

T = TypeVar("T")
Interventions = dict[int, list[Operator]]


@dataclass(frozen=True)
class Treatment:
    """What is done to the model for one request: a capping experiment and a steering coefficient."""

    cap: str | None = None
    alpha: float = 0.0
    interventions: Interventions = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"cap": self.cap, "alpha": self.alpha}


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool
    projections: list[float | None]  # every assistant turn of the conversation with the answer, at the monitored layer
    running_projection: float | None = None  # streaming only: the mean over generated tokens


@dataclass(frozen=True)
class StreamError:
    status: int
    message: str


StreamItem = TokenStep | Answer | StreamError


def _steering(axis: Axis, layer: int, alpha: float, *, raw: bool = False) -> Interventions:
    from personaxis.steering import steering_interventions

    return {k: list(v) for k, v in steering_interventions(axis, [layer], alpha, raw=raw).items()}


class ModelService:
    """One loaded model, its axis and optional capping config; ``cap``/``alpha`` are the server's defaults.

    α is a fraction of the layer's mean residual norm, or with ``raw_alpha`` the reference's coefficient of the
    stored axis row (as ``personaxis steer --raw``)."""

    def __init__(self, lm: LoadedModel, axis: Axis, capping: Any | None = None, *, layer: int | None = None,
                 default_cap: str | None = None, default_alpha: float = 0.0, steer_layer: int | None = None,
                 raw_alpha: bool = False) -> None:
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
        try:
            self.treatment(default_cap, default_alpha)  # fail early on a bad default
        except ApiError as exc:
            raise ValueError(exc.message) from None

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
        parts: list[Interventions] = []
        if cap is not None:
            if self.capping is None:
                raise ApiError(400, f"unknown capping experiment {cap!r}: this server has no capping config", param="cap")
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
    def _prompt(self, messages: Sequence[Any], max_new_tokens: int) -> tuple[Conversation, list[int]]:
        try:
            conversation = validate_conversation(messages)
            prompt = render_prompt(self.lm.tokenizer, conversation, self.lm.profile)
        except ConversationError as exc:
            raise ApiError(422, str(exc), param="messages") from None
        limit = self.lm.profile.max_context
        if limit and len(prompt) + max_new_tokens > limit:
            raise ApiError(422, f"the conversation has {len(prompt)} tokens: with {max_new_tokens} new tokens it exceeds "
                                f"the model's context of {limit}", param="messages")
        return conversation, prompt

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
            rows = monitor_transcripts(self.lm, self.axis, transcripts, layers=[self.layer],
                                       interventions=treatment.interventions)
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
                return self._projections([*conversation, {"role": "assistant", "content": text}], treatment.interventions)
            return [*self._projections(conversation, treatment.interventions), None]
        except ValueError:  # ConversationError, MonitorError: a template that rewrote the answer, …
            return [None] * (earlier + 1)

    def answer_locked(self, messages: Sequence[Any], treatment: Treatment, settings: StreamSettings) -> Answer:
        config = SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, seed=settings.seed, batch_size=1)
        with self.lock:
            conversation, prompt = self._prompt(messages, settings.max_new_tokens)
            gen = generate(self.lm, [conversation], config, interventions=treatment.interventions)[0]
            # The web app shows answers without surrounding whitespace, streamed or not (see stream.py).
            text, stopped = gen.text.strip(), gen.stopped
            for s in settings.stop:
                cut = text.find(s) if s else -1
                if cut >= 0:
                    text, stopped = text[:cut].rstrip(), True
            with torch.inference_mode():
                projections = self._with_answer(conversation, text, treatment)
        return Answer(text, len(prompt), gen.new_tokens, stopped, projections)

    async def answer(self, messages: Sequence[Any], treatment: Treatment, settings: StreamSettings) -> Answer:
        return await run_in_threadpool(self.answer_locked, messages, treatment, settings)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(fn, *args)

    def _prepare_locked(self, messages: Sequence[Any], max_new_tokens: int) -> tuple[Conversation, list[int]]:
        with self.lock:  # the tokenizer is shared state too
            return self._prompt(messages, max_new_tokens)

    async def prepare(self, messages: Sequence[Any], max_new_tokens: int) -> tuple[Conversation, list[int]]:
        """Validate and tokenise before a stream starts, so that bad requests get a plain 4xx, not a broken stream."""
        return await run_in_threadpool(self._prepare_locked, messages, max_new_tokens)

    async def stream(self, prepared: tuple[Conversation, list[int]], treatment: Treatment,
                     settings: StreamSettings) -> AsyncIterator[StreamItem]:
        """Token steps, then the complete :class:`Answer` (or a :class:`StreamError`). Generation runs in a worker
        thread that holds the lock; leaving the iterator early (client gone) stops it at the next token."""
        conversation, prompt = prepared
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamItem | None] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: StreamItem | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        def work() -> None:
            try:
                with self.lock:
                    if cancel.is_set():
                        return
                    end: StreamEnd | None = None
                    with apply_interventions(self.lm, treatment.interventions):
                        for step in stream_answer(self.lm, prompt, settings, stop_ids=self.stop_ids, layer=self.layer,
                                                  unit=self.axis.unit(self.layer), cancel=cancel):
                            if isinstance(step, StreamEnd):
                                end = step
                            else:
                                emit(step)
                    assert end is not None
                    if end.cancelled:
                        return
                    with torch.inference_mode():
                        projections = self._with_answer(conversation, end.text, treatment)
                    emit(Answer(end.text, len(prompt), end.new_tokens, end.stopped, projections, end.projection))
            except ApiError as exc:
                emit(StreamError(exc.status, exc.message))
            except Exception as exc:  # reported in the stream: the response has already started
                emit(StreamError(500, f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                emit(None)

        thread = threading.Thread(target=work, name="personaxis-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield item
        finally:
            cancel.set()
