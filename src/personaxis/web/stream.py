"""Token-by-token generation for one conversation, with the running projection of the answer on the axis.

One row, a key/value cache, logits for the last position only. Interventions (steering, capping) are applied by the
caller around the loop (:func:`personaxis.interventions.apply_interventions`); a reader at the monitored layer sees
the written stream. Each generated token is fed back once, which gives both the next logits and the token's own block
output, so the running projection is the mean of ``⟨h_l, â_l⟩`` over the answer tokens so far — the quantity the
teacher-forced per-turn projection measures once the answer is complete.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from personaxis.generation import answer_generator, forward_kwargs, sample_tokens
from personaxis.hooks import residual_hooks
from personaxis.models import LoadedModel


@dataclass(frozen=True)
class StreamSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenStep:
    """Text that became final with this token (may be empty), tokens so far, mean projection so far."""

    delta: str
    n_tokens: int
    projection: float | None


@dataclass(frozen=True)
class StreamEnd:
    text: str
    new_tokens: int
    stopped: bool  # ended on an end-of-turn token or a stop string (False: cut at max_new_tokens, or cancelled)
    cancelled: bool
    projection: float | None  # running mean at the end


class TextTracker:
    """Incremental detokenisation: emits only text that no later token can change, holding back a possible start of a
    stop string and incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.hit_stop = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        for s in self.stop:
            cut = text.find(s)
            if cut >= 0:
                self.text, self.hit_stop = text[:cut], True
                return self._flush(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        return self._flush(max(self.emitted, len(text) - self.hold))

    def _flush(self, upto: int) -> str:
        delta = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return delta

    def finish(self) -> str:
        self.text = self.text.rstrip()
        return self._flush(len(self.text))


@torch.inference_mode()
def stream_answer(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    settings: StreamSettings,
    *,
    stop_ids: Sequence[int],
    layer: int,
    unit: Tensor,
    cancel: threading.Event | None = None,
) -> Iterator[TokenStep | StreamEnd]:
    """Yield a :class:`TokenStep` per generated token, then one :class:`StreamEnd`."""
    from transformers import DynamicCache

    model = lm.model
    device = lm.device
    cache_kw, has_keep = forward_kwargs(model)
    direction = unit.to(device=device, dtype=torch.float32)
    latest: dict[str, float] = {}

    def read(hidden: Tensor, mask: Tensor | None) -> None:
        latest["projection"] = float(hidden[0, -1].to(torch.float32) @ direction)

    # The same random stream as the first answer of `generate` with this seed: the same text for the same settings.
    generator = answer_generator(int(settings.seed), 0) if settings.seed is not None else None

    def choose(logits: Tensor) -> int:
        uniform = torch.rand(1, generator=generator).to(device) if settings.temperature > 0 else torch.zeros(1)
        return int(sample_tokens(logits.unsqueeze(0), settings.temperature, settings.top_p, uniform)[0])

    stops = {int(s) for s in stop_ids}
    tracker = TextTracker(lm.tokenizer, settings.stop)
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    projections: list[float] = []
    stopped = cancelled = False

    def forward(input_ids: Tensor) -> Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, cache_kw: cache, "use_cache": True}
        if has_keep:
            kwargs["logits_to_keep"] = 1
        return model(**kwargs).logits[0, -1]

    def running() -> float | None:
        return sum(projections) / len(projections) if projections else None

    with residual_hooks(lm, readers={layer: [read]}):
        logits = forward(ids)
        for _ in range(settings.max_new_tokens):
            token = choose(logits)
            if token in stops:
                stopped = True
                break
            delta = tracker.push(token)
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            logits = forward(torch.tensor([[token]], dtype=torch.long, device=device))
            projections.append(latest["projection"])
            yield TokenStep(delta, len(tracker.ids), running())
            if tracker.hit_stop:
                stopped = True
                break
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
    tail = tracker.finish()
    if tail:
        yield TokenStep(tail, len(tracker.ids), running())
    yield StreamEnd(tracker.text, len(tracker.ids), stopped, cancelled, running())
