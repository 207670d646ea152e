"""Persona drift: project every assistant turn of a conversation onto the Assistant Axis.

A turn's projection is the mean, over its response tokens, of ``⟨h_l, â_l⟩`` (the block-``l`` output on the unit
axis), read in one teacher-forced forward pass over the whole conversation (never one pass per turn). Conversations
longer than the model's context are cut into *windows* that start at a user turn (the system prompt is kept while it
fits). By default (``windows="chunked"``) a window opens with at most half a context and takes the turns that follow
while they fit, so every turn keeps at least the longest history that fits in half the context and the tokens
projected are at most about twice the conversation's: cost proportional to the transcript. ``windows="longest"`` gives every turn the
longest history that fits, in the fewest passes that do so (up to a context of re-read history per turn). Planning
is linear in the number of messages in both. Turns that lost history are flagged ``truncated``.

Transcripts are JSON objects ``{"conversation": [{"role", "content"}, ...], ...}``; other keys (``model``,
``domain``, ``turns`` …) are kept as metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from personaxis.activations import extract_rendered
from personaxis.axis import Axis
from personaxis.chat import (
    Conversation,
    ConversationError,
    RenderedChat,
    ResponseSpan,
    normalize_conversation,
    render_chat,
    validate_conversation,
)
from personaxis.interventions import Interventions, apply_interventions
from personaxis.layer_selection import select_layers
from personaxis.models import LoadedModel


class MonitorError(ValueError):
    """A transcript cannot be read or monitored."""


@dataclass
class Transcript:
    """A conversation to monitor.

    Attributes:
        name: how results name it (the file stem for a file).
        conversation: the validated ``{"role", "content"}`` messages.
        meta: the other keys of the transcript's JSON object.
        source: the file it was read from, if any.
    """

    name: str
    conversation: Conversation
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None


@dataclass(frozen=True)
class TurnProjection:
    """One assistant turn on the axis. ``context_tokens`` counts every token the model saw up to the end of this
    response. When the history did not fit, ``truncated`` is set: the model saw the system prompt (unless it was
    dropped too) and the messages from ``history_start`` on; ``dropped_messages`` counts what it did not see.

    Attributes:
        transcript: the transcript's name.
        turn: the assistant turn's index among the transcript's assistant turns (zero-based).
        message_index: its index in the conversation's messages.
        projections: ``{layer: ⟨h, â_l⟩}``, the turn's mean block output projected on the unit axis, in the residual
            stream's units (higher = more Assistant-like).
        truncated: whether the model saw less than the whole history (or a clipped response).
        history_start: the index of the first non-system message the model saw.
        dropped_messages: messages left out before it (the system prompt included when it was dropped).
        context_tokens: the tokens the model saw up to the end of this response.
        response_tokens: the tokens of this response.
        window: the index of the window it was scored in.
    """

    transcript: str
    turn: int
    message_index: int
    projections: dict[int, float]
    truncated: bool
    history_start: int
    dropped_messages: int
    context_tokens: int
    response_tokens: int
    window: int

    def row(self) -> dict[str, Any]:
        return {
            "transcript": self.transcript,
            "turn": self.turn,
            "message_index": self.message_index,
            **{f"layer_{layer}": value for layer, value in self.projections.items()},
            "truncated": self.truncated,
            "history_start": self.history_start,
            "dropped_messages": self.dropped_messages,
            "context_tokens": self.context_tokens,
            "response_tokens": self.response_tokens,
            "window": self.window,
        }


@dataclass(frozen=True)
class Window:
    """A rendered slice of a conversation (cut right after its last response) and the global turns it scores."""

    rendered: RenderedChat
    turns: list[int]
    start: int  # global index of the first non-system message in the slice
    dropped: int  # non-system messages before the slice that were left out
    system_dropped: bool
    clipped: bool  # the (single) response was longer than the context and was cut


# ------------------------------------------------------------------------------------------------ reading input
def transcript_from_data(data: Any, name: str = "transcript", source: str | None = None) -> Transcript:
    """A transcript from a decoded JSON object (or a bare list of messages); validates the conversation."""
    where = source or name
    if isinstance(data, list):
        data = {"conversation": data}
    if not isinstance(data, dict):
        raise MonitorError(f"{where}: a transcript must be a JSON object with a 'conversation' list")
    if "conversation" not in data:
        raise MonitorError(f"{where}: no 'conversation' key (found: {', '.join(map(str, data)) or 'nothing'})")
    try:
        conversation = validate_conversation(data["conversation"], require_assistant=True)
    except ConversationError as exc:
        raise MonitorError(f"{where}: {exc}") from None
    meta = {k: v for k, v in data.items() if k != "conversation"}
    return Transcript(name=name, conversation=conversation, meta=meta, source=source)


def load_transcript(path: str | Path) -> Transcript:
    """Read one transcript file: JSON with ``conversation: [{"role", "content"}, ...]`` (or a bare list of messages).

    Args:
        path: the JSON file (UTF-8).

    Returns:
        The :class:`Transcript`, named after the file's stem; keys other than ``conversation`` go to its ``meta``.

    Raises:
        MonitorError: the file is missing, not UTF-8, not valid JSON, has no ``conversation``, or the conversation is
            malformed or has no assistant turn.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MonitorError(f"{path}: transcript file not found") from None
    except UnicodeDecodeError as exc:
        raise MonitorError(f"{path}: not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MonitorError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    return transcript_from_data(data, name=path.stem, source=str(path))


def transcript_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their ``*.json`` files (sorted)."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if p.is_file())
            if not found:
                raise MonitorError(f"{path}: folder holds no .json transcripts")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise MonitorError(f"{path}: no such file or folder")
    if not files:
        raise MonitorError("no transcripts given")
    return files


def load_transcripts(paths: Iterable[str | Path]) -> list[Transcript]:
    """Read transcripts from files and folders; names are file stems, made unique with their folder if needed."""
    files = transcript_files(paths)
    transcripts = [load_transcript(p) for p in files]
    stems = [t.name for t in transcripts]
    for t, p in zip(transcripts, files, strict=True):
        if stems.count(t.name) > 1:
            t.name = str(p.with_suffix(""))
    return transcripts


# ------------------------------------------------------------------------------------------------ windows
WindowMode = Literal["chunked", "longest"]


def _response_end(lm: LoadedModel, messages: Conversation, *, strict: bool = False) -> int | None:
    """Where the last assistant turn's content ends, in tokens, in the rendering of ``messages`` (which end with
    that turn): ``render_chat(...).spans[-1].end`` for one template render and one tokenisation, without locating
    every earlier turn. ``None`` when the template refuses the slice (``strict``: raise instead)."""
    import bisect

    tokenizer, profile = lm.tokenizer, lm.profile
    try:
        conversation = normalize_conversation(messages, profile)
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=False, **profile.template_kwargs
        )
        prefix = (
            tokenizer.apply_chat_template(
                conversation[:-1], tokenize=False, add_generation_prompt=True, **profile.template_kwargs
            )
            if len(conversation) > 1
            else None
        )
    except ConversationError:
        if strict:
            raise
        return None
    except Exception as exc:  # the template's own error
        if strict:
            raise MonitorError(f"the chat template refused the conversation: {exc}") from None
        return None
    content = conversation[-1]["content"].strip()
    if isinstance(prefix, str) and text.startswith(prefix):
        char_start = text.find(content, len(prefix))
    else:  # as render_chat: every message's content in order, the last one after the others
        cursor = 0
        for message in conversation[:-1]:
            found = text.find(message["content"].strip(), cursor) if message["content"].strip() else -1
            if found >= 0:
                cursor = found + len(message["content"].strip())
        char_start = text.find(content, cursor)
    if char_start < 0:
        if strict:
            raise ConversationError("the last assistant turn was not found in the rendered chat (template rewrote it?)")
        return None
    char_end = char_start + len(content)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    last = bisect.bisect_left([o[0] for o in offsets], char_end) - 1
    while last >= 0 and offsets[last][1] <= offsets[last][0]:  # zero-width tokens carry no content
        last -= 1
    return last + 1 if last >= 0 and offsets[last][1] > char_start else None


def _fits(lm: LoadedModel, messages: Conversation, limit: int) -> bool:
    end = _response_end(lm, messages)
    return end is not None and end <= limit


def _cut(chat: RenderedChat, end: int) -> RenderedChat:
    return RenderedChat(text=chat.text, input_ids=chat.input_ids[:end], spans=chat.spans)


def plan_windows(
    lm: LoadedModel, conversation: Conversation, max_tokens: int | None = None, *, mode: WindowMode = "chunked"
) -> list[Window]:
    """Cut a validated conversation into windows of at most ``max_tokens`` tokens (default: the model's context).

    A conversation that fits is one window. Otherwise windows start at user turns (the system prompt kept while it
    fits) and each turn is scored in a window that ends with it or a later turn:

    - ``"longest"``: every turn gets the longest history that fits. Exact, but each window re-reads up to a whole
      context of history for the turns after it, so projecting costs up to (turns × context) tokens.
    - ``"chunked"`` (the default): a window's first turn gets the longest history with which it fits in half the
      context, and the window is extended with the turns that follow while they fit; every turn keeps at least that
      much history (or all of it), and projecting costs at most about twice the conversation's tokens.

    Planning tokenises each message once and renders a few slices per window (each bounded by the context, found
    by bisection), so it takes time linear in the conversation's length.
    """
    limit = max_tokens if max_tokens is not None else lm.profile.max_context
    conv = list(conversation)
    system = conv[:1] if conv and conv[0]["role"] == "system" else []
    first = len(system)
    assistant_at = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not assistant_at:
        raise ConversationError("the conversation has no assistant turn")
    if not limit or (_response_end(lm, conv[: assistant_at[-1] + 1], strict=True) or 0) <= limit:
        try:
            whole = render_chat(lm.tokenizer, conv[: assistant_at[-1] + 1], lm.profile)
        except ConversationError:
            raise
        except Exception as exc:  # the template's own error
            raise MonitorError(f"the chat template refused the conversation: {exc}") from None
        return [Window(_cut(whole, whole.spans[-1].end), list(range(len(assistant_at))), first, 0, False, False)]

    import bisect

    starts = sorted({first, *(i for i in range(first, len(conv)) if conv[i]["role"] == "user")})
    # A lower bound on a slice's tokens (its contents, each tokenised alone, less a merge or two at the edges): a
    # slice whose bound exceeds the budget cannot fit and is never rendered. Fitting is monotone (a slice that fits
    # still fits without its first messages), so the earliest start that fits and the last turn a window can take
    # are found by bisection: a few renders per window, each bounded by the context.
    counts = [len(ids) for ids in lm.tokenizer([m["content"] for m in conv], add_special_tokens=False)["input_ids"]]
    lower = [0]
    for count in counts:
        lower.append(lower[-1] + max(0, count - 2))

    def bound(prefix: Conversation, start: int, stop: int) -> int:
        return (lower[1] if prefix else 0) + lower[stop] - lower[start]

    def earliest(prefix: Conversation, candidates: list[int], stop: int, budget: int) -> int | None:
        """The first start in ``candidates`` (ascending) whose slice up to ``stop`` fits ``budget``, or None."""
        lo = next((i for i, c in enumerate(candidates) if bound(prefix, c, stop) <= budget), len(candidates))
        hi = len(candidates) - 1
        if lo > hi or not _fits(lm, prefix + conv[candidates[hi] : stop], budget):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if _fits(lm, prefix + conv[candidates[mid] : stop], budget):
                hi = mid
            else:
                lo = mid + 1
        return candidates[lo]

    windows: list[Window] = []
    # Earliest start still possible, with and without the system prompt: a later turn never fits with more history
    # than an earlier one did (its slice from the same start is longer), so no start before these is tried.
    lowest = {True: first, False: first}
    opening = limit // 2 if mode == "chunked" else limit  # history budget of a window's first turn
    turn = 0
    while turn < len(assistant_at):
        end = assistant_at[turn] + 1
        chosen: tuple[Conversation, int] | None = None
        for budget in dict.fromkeys((opening if windows else limit, limit)):
            # Most history first: system + slice from a user turn, then without system, then the response alone.
            for prefix, low in [(system, lowest[True]), ([], lowest[False])] if system else [([], lowest[True])]:
                candidates = [c for c in starts[bisect.bisect_left(starts, low) :] if c < end]
                found = earliest(prefix, candidates, end, budget)
                if found is not None:
                    chosen = (prefix, found)
                    break
            if chosen is None and _fits(lm, conv[assistant_at[turn] : end], budget):
                chosen = ([], assistant_at[turn])
            if chosen is not None:
                break
        if chosen is None:  # one response longer than the context: keep the tokens that fit
            chat = render_chat(lm.tokenizer, conv[assistant_at[turn] : end], lm.profile)
            span = chat.spans[-1]
            if span.start >= limit:
                raise MonitorError(f"turn {turn}: the chat header alone exceeds the context of {limit} tokens")
            clipped = RenderedChat(
                chat.text, chat.input_ids[:limit], [ResponseSpan(span.turn, span.message_index, span.start, limit)]
            )
            windows.append(Window(clipped, [turn], assistant_at[turn], assistant_at[turn] - first, bool(system), True))
            lowest = {True: end, False: end}
            turn += 1
            continue
        prefix, start = chosen
        # Extend: the later turns that fit with the same start (their longest history here), found by bisection.
        lo, hi = turn, turn
        while hi + 1 < len(assistant_at) and bound(prefix, start, assistant_at[hi + 1] + 1) <= limit:
            hi += 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fits(lm, prefix + conv[start : assistant_at[mid] + 1], limit):
                lo = mid
            else:
                hi = mid - 1
        last = lo
        if system and not prefix:  # a turn that fits with the system prompt gets a window that keeps it
            for later in range(turn + 1, last + 1):
                latest = starts[bisect.bisect_right(starts, assistant_at[later]) - 1]
                if _fits(lm, system + conv[latest : assistant_at[later] + 1], limit):
                    last = later - 1
                    break
        turns = list(range(turn, last + 1))
        turn = last + 1
        chat = render_chat(lm.tokenizer, prefix + conv[start : assistant_at[turns[-1]] + 1], lm.profile)
        windows.append(
            Window(_cut(chat, chat.spans[-1].end), turns, start, start - first, bool(system) and not prefix, False)
        )
        if prefix or not system:
            lowest[True] = start
        else:
            lowest = {True: assistant_at[turns[-1]] + 1, False: start}
    return windows


# ------------------------------------------------------------------------------------------------ projecting
def _layer_list(axis: Axis, layers: Sequence[int] | Literal["all"] | int | None) -> list[int]:
    assert axis.target_layer is not None
    return select_layers(layers, axis.n_layers, default=[axis.target_layer], check=axis.layer)


def monitor_transcripts(
    lm: LoadedModel,
    axis: Axis,
    transcripts: Sequence[Transcript],
    *,
    layers: Sequence[int] | Literal["all"] | int | None = None,
    max_tokens: int | None = None,
    interventions: Interventions | None = None,
    show_progress: bool = False,
    windows: WindowMode = "chunked",
) -> list[TurnProjection]:
    """Project every assistant turn of every transcript at ``layers`` (default: the axis' target layer; ``"all"``).

    All windows of all transcripts go through :func:`extract_rendered` together (length-sorted batches, one forward
    per batch, stopped after the deepest requested layer). ``interventions`` (steering, capping) are applied during
    the pass, so the projections show the stream the model actually had. ``windows``: how conversations longer
    than the context are cut (:func:`plan_windows`).

    Args:
        lm: the model.
        axis: the axis to project on; it must fit the model (same layer count and hidden size).
        transcripts: the conversations, each with at least one assistant turn.
        layers: zero-based block indices (block ``l``'s output, see docs/design.md "Conventions"): an int, a list
            (duplicates dropped, order kept), ``"all"``, or ``None`` for the axis' target layer.
        max_tokens: the longest window in tokens (default: the model's context).
        interventions: operators per layer applied during the forward passes, as in
            :func:`~personaxis.interventions.apply_interventions`.
        show_progress: show a progress bar over tokens.
        windows: ``"chunked"`` (the default) or ``"longest"``.

    Returns:
        One :class:`TurnProjection` per assistant turn, transcript by transcript in order: ``projections[layer]`` is
        ``⟨h, â_l⟩``, the turn's mean block output projected on the unit axis, in the residual stream's units
        (higher = more Assistant-like).

    Raises:
        AxisError: the axis does not fit the model.
        MonitorError: a transcript's conversation is malformed or refused by the chat template.
        ValueError: no layer is chosen.
        IndexError: a layer is out of range.
    """
    axis.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
    layer_list = _layer_list(axis, layers)
    plans: list[tuple[Transcript, list[int], list[Window]]] = []
    for t in transcripts:
        try:
            conv = validate_conversation(t.conversation, require_assistant=True)
            planned = plan_windows(lm, conv, max_tokens, mode=windows)
        except ConversationError as exc:
            raise MonitorError(f"{t.source or t.name}: {exc}") from None
        plans.append((t, [i for i, m in enumerate(conv) if m["role"] == "assistant"], planned))
    rendered = [w.rendered for _, _, planned in plans for w in planned]
    limit = max(max_tokens or 0, lm.profile.max_context or 0, 8192)
    with apply_interventions(lm, interventions):
        acts = extract_rendered(lm, rendered, layers=layer_list, max_batch_tokens=limit, show_progress=show_progress)
    units = axis.unit()[layer_list]  # [n_req, hidden]
    rows: list[TurnProjection] = []
    k = 0
    for t, assistant_at, planned in plans:
        for w_index, window in enumerate(planned):
            proj = (acts[k].means * units).sum(-1)  # [n_turns_in_window, n_req]
            k += 1
            offset = len(window.rendered.spans) - len(window.turns)  # earlier spans in a window are history only
            for j, turn in enumerate(window.turns):
                span = window.rendered.spans[offset + j]
                dropped = window.dropped + (1 if window.system_dropped else 0)
                rows.append(
                    TurnProjection(
                        transcript=t.name,
                        turn=turn,
                        message_index=assistant_at[turn],
                        projections={layer: float(proj[offset + j, i]) for i, layer in enumerate(layer_list)},
                        truncated=dropped > 0 or window.clipped,
                        history_start=window.start,
                        dropped_messages=dropped,
                        context_tokens=span.end,
                        response_tokens=len(span),
                        window=w_index,
                    )
                )
    return rows


def monitor_conversation(
    lm: LoadedModel, axis: Axis, conversation: Sequence[Any], **kwargs: Any
) -> list[TurnProjection]:
    """Per-turn projections of one conversation (a list of ``{"role", "content"}`` messages).

    Args:
        lm: the model.
        axis: the axis to project on.
        conversation: the messages, with at least one assistant turn.
        **kwargs: the keywords of :func:`monitor_transcripts` (``layers``, ``max_tokens``, ``interventions``,
            ``show_progress``, ``windows``).

    Returns:
        One :class:`TurnProjection` per assistant turn (transcript name ``"conversation"``), as
        :func:`monitor_transcripts` gives them.

    Raises:
        MonitorError: the conversation is malformed or has no assistant turn; and the errors of
            :func:`monitor_transcripts`.
    """
    return monitor_transcripts(lm, axis, [transcript_from_data(list(conversation), name="conversation")], **kwargs)
