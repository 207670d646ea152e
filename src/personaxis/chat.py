"""Render conversations with a model's chat template and find the tokens of every assistant turn's content."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from personaxis.models import ModelProfile

Message = dict[str, str]
Conversation = list[Message]
ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation is malformed."""


@dataclass(frozen=True)
class ResponseSpan:
    """Token positions ``[start, end)`` of one assistant turn's content (no header, no end-of-turn token)."""

    turn: int  # index among the assistant turns
    message_index: int  # index in the (normalised) conversation
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class TurnSpan:
    """Token positions ``[start, end)`` of one user or assistant message's content."""

    role: str
    start: int
    end: int


@dataclass(frozen=True)
class RenderedChat:
    text: str
    input_ids: list[int]
    spans: list[ResponseSpan]  # the assistant turns, the tokens averaged for activations
    turn_spans: list[TurnSpan] = field(default_factory=list)  # every user and assistant turn, in order


def validate_conversation(messages: Sequence[Any], *, require_assistant: bool = False) -> Conversation:
    """Check roles and contents; return a clean list of ``{"role", "content"}`` dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ConversationError("a conversation must be a list of {'role', 'content'} messages")
    if len(messages) == 0:
        raise ConversationError("the conversation is empty")
    clean: Conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConversationError(f"message {i} is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConversationError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError(f"message {i} ({role}) has no text content")
        if role == "system" and i != 0:
            raise ConversationError(f"message {i}: a system message may only come first")
        if role != "system" and not content.strip():
            raise ConversationError(f"message {i} ({role}) has empty content")
        clean.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in clean):
        raise ConversationError("the conversation has no assistant turn")
    return clean


def normalize_conversation(
    messages: Sequence[Any], profile: ModelProfile, *, require_assistant: bool = False
) -> Conversation:
    """Validate, and merge the system prompt into the first user turn for templates without a system role.

    An explicitly empty system message is kept as given on templates with a system role (as the reference does: the
    template then renders an empty system turn instead of inserting its own default system prompt); on templates
    without one there is nothing to merge and it is dropped. Contents are never stripped.
    """
    clean = validate_conversation(messages, require_assistant=require_assistant)
    if clean[0]["role"] == "system":
        system = clean[0]["content"]
        rest = clean[1:]
        if not profile.supports_system_role and not system.strip():
            clean = rest
        elif not profile.supports_system_role:
            if not rest or rest[0]["role"] != "user":
                raise ConversationError("a system prompt on a template without system role needs a user turn after it")
            clean = [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    if not clean:
        raise ConversationError("the conversation holds only an empty system prompt")
    return clean


def render_chat(
    tokenizer: Any,
    messages: Sequence[Any],
    profile: ModelProfile,
    *,
    add_generation_prompt: bool = False,
    require_assistant: bool = False,
) -> RenderedChat:
    """Render ``messages`` with the chat template, tokenise, and locate each assistant turn's content tokens."""
    conversation = normalize_conversation(messages, profile, require_assistant=require_assistant)
    text = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **profile.template_kwargs
    )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoding["offset_mapping"]]
    spans: list[ResponseSpan] = []
    turn_spans: list[TurnSpan] = []
    cursor = 0
    turn = 0
    tokens = _TokenOffsets(offsets)
    for index, message in enumerate(conversation):
        content = _rendered_content(message["content"], text, cursor)
        char_start = text.find(content, cursor) if content else -1
        if message["role"] != "assistant":
            if char_start >= 0:
                cursor = char_start + len(content)
                positions = tokens.overlapping(char_start, cursor)
                if message["role"] == "user" and positions:
                    turn_spans.append(TurnSpan("user", positions[0], positions[-1] + 1))
            continue
        # Search after the assistant header: a short content ("a", "user") also occurs inside the template's markup.
        header_end = _assistant_content_start(tokenizer, conversation[:index], text, profile) if content else -1
        if header_end > cursor:
            cursor = header_end
            char_start = text.find(content, cursor)
        if char_start < 0:
            raise ConversationError(f"assistant turn {turn} was not found in the rendered chat (template rewrote it?)")
        char_end = char_start + len(content)
        cursor = char_end
        token_positions = tokens.overlapping(char_start, char_end)
        if not token_positions:
            raise ConversationError(f"assistant turn {turn} has no tokens")
        spans.append(
            ResponseSpan(turn=turn, message_index=index, start=token_positions[0], end=token_positions[-1] + 1)
        )
        turn_spans.append(TurnSpan("assistant", token_positions[0], token_positions[-1] + 1))
        turn += 1
    if require_assistant and not spans:
        raise ConversationError("the conversation has no assistant turn")
    return RenderedChat(text=text, input_ids=input_ids, spans=spans, turn_spans=turn_spans)


class _TokenOffsets:
    """The character offsets of a chat's tokens, to find the tokens of a character range.

    Offsets of a fast tokenizer run forward, so a range's tokens are found by bisection (linear in the chat, not
    turns × tokens); offsets that do not (rare tokenizers) are scanned in full."""

    def __init__(self, offsets: list[tuple[int, int]]) -> None:
        self.starts = [o[0] for o in offsets]
        self.ends = [o[1] for o in offsets]
        self.monotone = all(
            self.starts[i] <= self.starts[i + 1] and self.ends[i] <= self.ends[i + 1] for i in range(len(offsets) - 1)
        )

    def overlapping(self, char_start: int, char_end: int) -> list[int]:
        """Every token that overlaps the characters ``[char_start, char_end)`` (a token shared with the markup
        included; empty tokens excluded)."""
        starts, ends = self.starts, self.ends
        window = (
            range(bisect.bisect_right(ends, char_start), bisect.bisect_left(starts, char_end))
            if self.monotone
            else range(len(starts))
        )
        return [t for t in window if ends[t] > char_start and starts[t] < char_end and ends[t] > starts[t]]


def _rendered_content(content: str, text: str, cursor: int) -> str:
    """The content as it appears in the rendered ``text``: exactly as given (a leading newline and trailing spaces
    are tokens of the turn, as in the reference), or stripped for templates that trim message contents."""
    if not content or content in text[cursor:]:
        return content
    return content.strip()


def _assistant_content_start(tokenizer: Any, before: Conversation, text: str, profile: ModelProfile) -> int:
    """Where an assistant turn's content starts in ``text``: the end of the messages before it rendered with the
    generation prompt, when ``text`` starts with that rendering; -1 when it does not (templates that rewrite history)."""
    if not before:
        return -1
    try:
        prefix = tokenizer.apply_chat_template(
            before, tokenize=False, add_generation_prompt=True, **profile.template_kwargs
        )
    except Exception:  # templates raise their own error types (jinja2.TemplateError, ...)
        return -1
    return len(prefix) if isinstance(prefix, str) and text.startswith(prefix) else -1


def render_prompt(tokenizer: Any, messages: Sequence[Any], profile: ModelProfile) -> list[int]:
    """Token ids of a conversation ending in a user turn, followed by the assistant header, ready to generate."""
    conversation = normalize_conversation(messages, profile)
    if conversation[-1]["role"] != "user":
        raise ConversationError("a prompt to generate from must end with a user message")
    return render_chat(tokenizer, conversation, profile, add_generation_prompt=True).input_ids


def build_conversation(system_prompt: str | None, question: str, answer: str | None = None) -> Conversation:
    """A single-turn chat: optional system prompt, a user question, optionally the assistant's answer."""
    conversation: Conversation = []
    if system_prompt:
        conversation.append({"role": "system", "content": system_prompt})
    conversation.append({"role": "user", "content": question})
    if answer is not None:
        conversation.append({"role": "assistant", "content": answer})
    return conversation
