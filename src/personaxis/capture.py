"""Response activations recorded while generating: the axis in one pass.

Generation computes the block outputs of every answer token as it feeds the token back (the last token of an answer
cut at ``max_new_tokens`` is never fed back: the engine runs one more step for it). A :class:`ResponseCapture` handed
to :func:`personaxis.generation.generate` reads those outputs with the readers of :mod:`personaxis.hooks` and keeps,
per prompt and layer, in float32:

- the outputs of the first ``EDGE`` and of the last ``EDGE`` generated tokens one by one, and the sum of those
  between (a token moves into the sum when it leaves the window of the last ``EDGE``);
- the L2 norm of every generated token's output.

Which tokens are "the answer's content" is decided afterwards, exactly as teacher-forced extraction decides it
(:mod:`personaxis.activations`): the conversation with the answer as stored is rendered with
:func:`personaxis.chat.render_chat`, and its content span is used when the rendered tokens up to the span's end
equal the prompt and the generated tokens (same tokens, same positions, so the same block outputs) and the tokens
it leaves out lie within the edges kept one by one. Otherwise :meth:`ResponseCapture.turn_activations` returns
``None`` and the caller extracts that rollout teacher-forced.

Memory: ``2 × EDGE + 1`` vectors per prompt and layer (under 1 MB per prompt for SmolLM2-135M) plus one float per
generated token and layer; the pipeline captures one chunk of prompts at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from personaxis.activations import TurnActivations
from personaxis.chat import Conversation, render_chat
from personaxis.hooks import Reader
from personaxis.models import LoadedModel

# How a run gets its activations: captured while generating (transformers backend), or teacher-forced afterwards.
EXTRACT_MODES: tuple[str, ...] = ("capture", "teacher-forced")
DEFAULT_EXTRACT_MODE = "capture"


def extract_mode(settings: Any) -> str:
    """The extraction mode of a run's settings (``settings.extra["extract"]``, capture unless set)."""
    mode = str(settings.extra.get("extract", DEFAULT_EXTRACT_MODE))
    if mode not in EXTRACT_MODES:
        raise ValueError(f"unknown extraction mode {mode!r}; choose one of: {', '.join(EXTRACT_MODES)}")
    return mode


def extract_extra(mode: str) -> dict[str, str]:
    """What an extraction mode adds to ``settings.extra``: nothing for the default."""
    if mode not in EXTRACT_MODES:
        raise ValueError(f"unknown extraction mode {mode!r}; choose one of: {', '.join(EXTRACT_MODES)}")
    return {} if mode == DEFAULT_EXTRACT_MODE else {"extract": mode}


# Generated tokens kept one by one at each end of an answer: the content span may leave out up to this many tokens at
# either end (leading or trailing whitespace, the end-of-turn token fed back) and still be taken from the capture.
EDGE = 4


class _DeviceStore:
    """The records of the captured layers that live on one device, stacked (index ``i`` is layer ``layers[i]``), and
    the current step's block outputs of those layers: each reader copies its layer's rows into ``step``, and
    :meth:`ResponseCapture.end_step` files them for every layer at once (a handful of operations per step instead of
    five per layer)."""

    def __init__(self, layers: list[int], n_prompts: int, max_new_tokens: int, like: Tensor) -> None:
        hidden = like.shape[-1]
        zeros = dict(dtype=torch.float32, device=like.device)
        self.layers = layers
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.slots = torch.zeros((len(layers), n_prompts * 2 * EDGE, hidden), **zeros)  # first EDGE, ring of last
        self.body = torch.zeros((len(layers), n_prompts, hidden), **zeros)  # the sum of the tokens between
        self.norms = torch.zeros((len(layers), n_prompts * max_new_tokens), **zeros)
        self.step = torch.zeros((len(layers), like.shape[0], hidden), **zeros)
        self.read: set[int] = set()

    def take(self, layer: int, rows: Tensor, plan: _StepPlan) -> None:
        """Copy ``rows`` ``[batch, hidden]`` (this step's outputs of ``layer``), those the plan records, into
        ``step``."""
        n = len(plan.batch_index)
        if self.step.shape[1] < n:  # more rows than any step before (at a step's first layer)
            self.step = self.step.new_zeros((self.step.shape[0], n, self.step.shape[2]))
        target = self.step[self.index[layer], :n]
        if plan.all_rows and n == rows.shape[0]:
            target.copy_(rows)
        elif rows.dtype is torch.float32:
            torch.index_select(rows, 0, plan.batch_index, out=target)
        else:
            target.copy_(rows.index_select(0, plan.batch_index))
        self.read.add(layer)

    def file(self, plan: _StepPlan) -> None:
        """File the step's outputs (when every layer was read: a forward that failed half-way records nothing)."""
        if len(self.read) == len(self.layers):
            h = self.step[:, : len(plan.batch_index)]
            if len(plan.evict_slot):
                self.body.index_add_(1, plan.evict_prompt, self.slots.index_select(1, plan.evict_slot))
            self.slots.index_copy_(1, plan.write_slot, h)
            self.norms.index_copy_(1, plan.norm_index, h.norm(dim=-1))
        self.read.clear()


@dataclass
class _StepPlan:
    batch_index: Tensor  # rows of the batch whose fed token is recorded
    write_slot: Tensor
    norm_index: Tensor
    evict_slot: Tensor  # slots whose token moves into the body sum before being overwritten
    evict_prompt: Tensor
    all_rows: bool  # batch_index is every row of the batch, in order


class ResponseCapture:
    """Per-prompt records of the block outputs of generated tokens (see the module's notes)."""

    def __init__(self, lm: LoadedModel, layers: Sequence[int] | None = None) -> None:
        self.lm = lm
        self.layers = (
            list(range(lm.profile.n_layers)) if layers is None else [lm.profile.check_layer(x) for x in layers]
        )
        self.n_prompts = 0
        self.max_new_tokens = 0
        self.fed: list[int] = []  # tokens recorded per prompt, in generation order
        self.prompts: list[list[int]] = []
        self.new_ids: list[list[int]] = []
        self._stores: dict[torch.device, _DeviceStore] = {}
        self._layer_device: dict[int, torch.device] = {}
        self._plan: _StepPlan | None = None
        self._plan_on: dict[torch.device, _StepPlan] = {}

    # -- called by the generation engine ------------------------------------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Forget earlier records; prepare for these prompts."""
        self.n_prompts = len(prompts)
        self.max_new_tokens = max_new_tokens
        self.fed = [0] * len(prompts)
        self.prompts = [list(p) for p in prompts]
        self.new_ids = [[] for _ in prompts]
        self._stores = {}
        self._layer_device = {}

    def readers(self) -> dict[int, list[Reader]]:
        return {layer: [self._reader(layer)] for layer in self.layers}

    def wants(self, prompt: int, token_index: int) -> bool:
        """Whether the token ``token_index`` of ``prompt`` being fed back now is still to be recorded."""
        return token_index == self.fed[prompt] and token_index < self.max_new_tokens

    def begin_step(self, batch_rows: Sequence[int], prompts: Sequence[int], token_indices: Sequence[int]) -> None:
        """The next forward feeds, in batch row ``batch_rows[i]``, token ``token_indices[i]`` of ``prompts[i]``."""
        if not batch_rows:
            self._plan = None
            return
        two = 2 * EDGE
        write, evict_slot, evict_prompt = [], [], []
        for prompt, g in zip(prompts, token_indices, strict=True):
            slot = prompt * two + (g if g < EDGE else EDGE + g % EDGE)
            write.append(slot)
            if g >= two:
                evict_slot.append(slot)
                evict_prompt.append(prompt)
            self.fed[prompt] = g + 1
        longs = dict(dtype=torch.long)
        rows = list(batch_rows)
        self._plan = _StepPlan(
            batch_index=torch.tensor(rows, **longs),
            write_slot=torch.tensor(write, **longs),
            norm_index=torch.tensor(
                [p * self.max_new_tokens + g for p, g in zip(prompts, token_indices, strict=True)], **longs
            ),
            evict_slot=torch.tensor(evict_slot, **longs),
            evict_prompt=torch.tensor(evict_prompt, **longs),
            all_rows=rows == list(range(len(rows))),
        )
        self._plan_on = {}

    def end_step(self) -> None:
        """File the step's records (every layer at once, per device)."""
        if self._plan is not None:
            for device, store in self._stores.items():
                store.file(self._plan_for(device))
        self._plan = None
        self._plan_on = {}

    def finish(self, new_ids: Sequence[Sequence[int]]) -> None:
        """The generated token ids of every prompt (as the engine returns them)."""
        self.new_ids = [list(ids) for ids in new_ids]

    # -- reading ------------------------------------------------------------------------------------------------

    def _plan_for(self, device: torch.device) -> _StepPlan:
        plan = self._plan_on.get(device)
        if plan is None:
            assert self._plan is not None
            plan = _StepPlan(*(t.to(device) if isinstance(t, Tensor) else t for t in vars(self._plan).values()))
            self._plan_on[device] = plan
        return plan

    def _store(self, layer: int, like: Tensor) -> _DeviceStore:
        """The store of ``layer``'s device (that of its block's parameters, else of the first output read), all made
        at the first decode step."""
        if not self._stores:
            for x in self.layers:
                params = [p.device for p in self.lm.layers[x].parameters() if p.device.type != "meta"]
                self._layer_device[x] = params[0] if params else like.device
            for device in dict.fromkeys(self._layer_device.values()):
                layers = [x for x in self.layers if self._layer_device[x] == device]
                self._stores[device] = _DeviceStore(layers, self.n_prompts, self.max_new_tokens, like.to(device))
        return self._stores[self._layer_device[layer]]

    def _reader(self, layer: int) -> Reader:
        def read(hidden: Tensor, _mask: Tensor | None) -> None:
            if self._plan is None:
                return  # a prefill forward: prompt tokens are not recorded
            store = self._store(layer, hidden[:, -1])
            device = store.step.device
            store.take(layer, hidden[:, -1].to(device), self._plan_for(device))

        return read

    # -- results ------------------------------------------------------------------------------------------------

    def span_of(self, prompt: int, conversation: Conversation) -> tuple[int, int] | None:
        """Generated-token indices ``[start, end)`` of the content span teacher-forced extraction would average for
        ``conversation`` (the prompt's conversation with its answer as stored), or None when the capture cannot give
        it (other tokens than generated, tokens left out beyond the edges, tokens never fed)."""
        rendered = render_chat(self.lm.tokenizer, conversation, self.lm.profile, require_assistant=True)
        if len(rendered.spans) != 1:
            return None
        span = rendered.spans[0]
        prompt_ids = self.prompts[prompt]
        offset = len(prompt_ids)
        start, end = span.start - offset, span.end - offset
        generated = prompt_ids + self.new_ids[prompt]
        if start < 0 or end > self.fed[prompt] or rendered.input_ids[: span.end] != generated[: span.end]:
            return None
        return start, end

    def turn_activations(self, prompt: int, conversation: Conversation) -> TurnActivations | None:
        """The captured means over the answer's content tokens, as :func:`personaxis.activations.extract_turn_means`
        gives them for ``conversation`` (one assistant turn), or None when the capture cannot give them."""
        span = self.span_of(prompt, conversation)
        return None if span is None else self.means_over(prompt, *span)

    def means_over(self, prompt: int, start: int, end: int) -> TurnActivations | None:
        """The captured means over generated tokens ``[start, end)`` of ``prompt``, or None when they were not all
        recorded or some token between the edges is left out."""
        n = self.fed[prompt]
        if not self._stores or not 0 <= start < end <= n or (n > 2 * EDGE and (start > EDGE or end < n - EDGE)):
            return None
        kept = [g for g in range(start, end) if g < EDGE or g >= max(EDGE, n - EDGE)]
        slots = [prompt * 2 * EDGE + (g if g < EDGE else EDGE + g % EDGE) for g in kept]
        with_body = n > 2 * EDGE
        means, norms = [], []
        for layer in self.layers:
            store = self._stores[self._layer_device[layer]]
            i = store.index[layer]
            total = store.slots[i, slots].sum(dim=0) if slots else torch.zeros_like(store.body[i, prompt])
            if with_body:
                total = total + store.body[i, prompt]
            means.append((total / (end - start)).cpu())
            base = prompt * self.max_new_tokens
            norms.append(store.norms[i, base + start : base + end].mean().cpu())
        return TurnActivations(
            means=torch.stack(means).unsqueeze(0),
            norms=torch.stack(norms).unsqueeze(0),
            n_tokens=[end - start],
            layers=list(self.layers),
        )
