"""The user side of simulated multi-turn conversations: scripted turns, a local user model, or an HTTP endpoint.

A simulator writes the next user message of many conversations at once. The scripted user replays the catalogue's
turns. A model user plays a human (the conversation's persona, wanting to talk about its topic): it sees the chat
with roles flipped — the target's answers as the *user* turns it replies to — and writes only the next message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from personaxis.chat import Conversation

USER_SYSTEM_PROMPT = (
    "You are role-playing a human user who is chatting with an AI assistant. {persona} You want to talk about: "
    "{topic}. Write only your own next message to the assistant, in the first person, in one to three sentences. "
    "Never write the assistant's reply and never say that you are an AI."
)
OPENING = "(Write your first message to the assistant.)"


@dataclass
class DriftState:
    """One conversation being simulated: its user persona and topic, scripted turns, and the target's view of it."""

    domain: str
    index: int
    persona: str
    topic: str
    script: tuple[str, ...]
    messages: Conversation = field(default_factory=list)


class UserSimulator(Protocol):
    name: str

    def next_messages(self, states: Sequence[DriftState], turn: int) -> list[str]: ...


class ScriptedUser:
    """Replays the catalogue's user turns."""

    name = "scripted"

    def next_messages(self, states: Sequence[DriftState], turn: int) -> list[str]:
        out = []
        for state in states:
            if turn >= len(state.script):
                raise ValueError(
                    f"{state.domain} conversation {state.index} has only {len(state.script)} scripted user "
                    f"turns; asked for turn {turn + 1}"
                )
            out.append(state.script[turn])
        return out


def user_view(state: DriftState) -> Conversation:
    """The chat as the user model sees it: its persona as the system prompt, roles flipped."""
    view: Conversation = [
        {
            "role": "system",
            "content": USER_SYSTEM_PROMPT.format(persona=state.persona.rstrip(".") + ".", topic=state.topic),
        },
        {"role": "user", "content": OPENING},
    ]
    for message in state.messages:
        flipped = "assistant" if message["role"] == "user" else "user"
        if message["role"] == "system":
            continue
        view.append({"role": flipped, "content": message["content"]})
    return view


def _clean(text: str, fallback: str) -> tuple[str, bool]:
    """Strip quotes and a leading speaker tag; the scripted turn when nothing usable is left."""
    text = text.strip().strip('"').strip()
    for tag in ("User:", "user:", "Me:"):
        if text.startswith(tag):
            text = text[len(tag) :].strip()
    return (text, False) if len(text.split()) >= 2 else (fallback, True)


class LocalModelUser:
    """A local chat model (another :class:`~personaxis.models.LoadedModel`) writes the user turns, batched."""

    def __init__(
        self, lm: Any, *, max_new_tokens: int = 64, temperature: float = 0.7, seed: int = 0, batch_size: int = 64
    ) -> None:
        from personaxis.generation import SamplingConfig

        self.lm = lm
        self.name = f"local:{lm.profile.name}"
        self.config = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size
        )
        self.fallbacks = 0

    def next_messages(self, states: Sequence[DriftState], turn: int) -> list[str]:
        from dataclasses import replace

        from personaxis.generation import generate

        config = replace(self.config, seed=None if self.config.seed is None else self.config.seed + 1000 * turn)
        answers = generate(self.lm, [user_view(s) for s in states], config, desc=f"user turn {turn + 1}")
        out = []
        for state, answer in zip(states, answers, strict=True):
            fallback = state.script[turn] if turn < len(state.script) else "Tell me more."
            text, fell_back = _clean(answer.text, fallback)
            self.fallbacks += fell_back
            out.append(text)
        return out


class EndpointUser:
    """An OpenAI-compatible ``/chat/completions`` endpoint writes the user turns (``OPENAI_BASE_URL``/``_API_KEY``)."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_new_tokens: int = 96,
        temperature: float = 0.7,
        transport: Any | None = None,
    ) -> None:
        from personaxis.judges.client import ChatClient

        self.model = model
        self.name = f"endpoint:{model}"
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.client = ChatClient(base_url=base_url, api_key=api_key, transport=transport)
        self.fallbacks = 0

    def next_messages(self, states: Sequence[DriftState], turn: int) -> list[str]:
        out = []
        for state in states:
            payload = {
                "model": self.model,
                "messages": user_view(state),
                "max_tokens": self.max_new_tokens,
                "temperature": self.temperature,
            }
            fallback = state.script[turn] if turn < len(state.script) else "Tell me more."
            text, fell_back = _clean(self.client.complete(payload), fallback)
            self.fallbacks += fell_back
            out.append(text)
        return out


def make_user(spec: str | None, **kwargs: Any) -> UserSimulator:
    """``None``/``"scripted"``: the catalogue; ``"endpoint:MODEL"``: an HTTP endpoint; else a local model path or id
    (``"embedded"`` for the embedded model)."""
    if spec is None or spec == "scripted":
        return ScriptedUser()
    if spec.startswith("endpoint:"):
        keep = {k: v for k, v in kwargs.items() if k in ("base_url", "api_key", "max_new_tokens", "temperature")}
        return EndpointUser(spec.split(":", 1)[1], **keep)
    from personaxis.models import load_model

    keep = {k: v for k, v in kwargs.items() if k in ("max_new_tokens", "temperature", "seed", "batch_size")}
    return LocalModelUser(load_model(spec), **keep)
