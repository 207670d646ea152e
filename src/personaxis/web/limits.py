"""Request limits: body size (enforced on the raw stream, before any parsing), message count and length, answer
length, the number of transcripts per request, and a token budget per request (every route that runs the model
counts the tokens it would read and write, and refuses the request with 413 past the budget, before it waits for
the model)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from personaxis.validate import lone_surrogate
from personaxis.web.errors import ApiError, error_body


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 2 * 1024 * 1024  # any request body (a transcript upload is the largest)
    max_message_chars: int = 16_000  # one message's content
    max_messages: int = 200  # messages in one conversation or transcript
    max_new_tokens: int = 512  # longest answer a request may ask for
    max_transcripts: int = 12  # transcripts projected in one request
    # Tokens one request may make the model read (conversation, transcripts) plus write (the answer): a few
    # seconds of the model on 2 cores for the embedded model, so one request cannot hold the model for minutes.
    max_request_tokens: int = 32_768

    def check_messages(self, messages: Sequence[Any], *, param: str = "messages") -> None:
        """Refuse conversations that are too long before any tokenisation (422 with the offending message)."""
        if len(messages) > self.max_messages:
            raise ApiError(
                422, f"{param}: {len(messages)} messages, more than the limit of {self.max_messages}", param=param
            )
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            at = lone_surrogate(content) if isinstance(content, str) else None
            if at is not None:
                raise ApiError(
                    422,
                    f"{param}.{i}.content: a lone surrogate (\\u{ord(content[at]):04x}) at character "
                    f"{at} is not text; send valid Unicode",
                    param=f"{param}.{i}.content",
                )
            if isinstance(content, str) and len(content) > self.max_message_chars:
                raise ApiError(
                    422,
                    f"{param}.{i}.content: {len(content)} characters, more than the limit of {self.max_message_chars}",
                    param=f"{param}.{i}.content",
                )

    @staticmethod
    def check_text(value: Any, *, param: str) -> None:
        """Refuse (422) any string inside ``value`` (lists and objects walked without recursion) that holds a lone
        surrogate: it cannot be tokenised, nor sent back as JSON."""
        stack: list[tuple[Any, str]] = [(value, param)]
        while stack:
            item, where = stack.pop()
            if isinstance(item, str):
                at = lone_surrogate(item)
                if at is not None:
                    raise ApiError(
                        422,
                        f"{where}: a lone surrogate (\\u{ord(item[at]):04x}) at character {at} is not "
                        "text; send valid Unicode",
                        param=where,
                    )
            elif isinstance(item, dict):
                stack.extend((v, f"{where}.{k}") for k, v in item.items())
                stack.extend((k, f"{where}.{k!r}") for k in item if isinstance(k, str))
            elif isinstance(item, list):
                stack.extend((v, f"{where}.{i}") for i, v in enumerate(item))

    def check_token_budget(
        self, tokenizer: Any, conversations: Sequence[Sequence[Any]], *, new_tokens: int = 0, param: str = "messages"
    ) -> int:
        """Count the tokens of every message's content (plus a few per message for the chat template) and
        ``new_tokens``; refuse with 413 past ``max_request_tokens``. Returns the count."""
        texts = [
            m["content"]
            for conv in conversations
            for m in conv
            if isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"]
        ]
        total = new_tokens + 8 * sum(len(conv) for conv in conversations)
        if texts:
            total += sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        if total > self.max_request_tokens:
            raise ApiError(
                413,
                f"{param}: this request needs about {total} tokens, more than this server's budget of "
                f"{self.max_request_tokens} tokens per request (serve --max-request-tokens); send "
                "shorter or fewer conversations",
                param=param,
            )
        return total

    def check_new_tokens(self, n: int, *, param: str = "max_tokens") -> int:
        if n < 1:
            raise ApiError(422, f"{param} must be at least 1, got {n}", param=param)
        if n > self.max_new_tokens:
            raise ApiError(422, f"{param} is {n}, more than this server's limit of {self.max_new_tokens}", param=param)
        return n


class _TooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException, so that FastAPI's body parsing passes it on unchanged."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body larger than the limit of {max_bytes} bytes")


class BodySizeLimit:
    """ASGI middleware: answer 413 when a request body exceeds ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = json.dumps(error_body(413, f"request body larger than the limit of {self.max_bytes} bytes")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)
