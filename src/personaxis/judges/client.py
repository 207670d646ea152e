"""A minimal, robust client for OpenAI-compatible ``POST /chat/completions`` endpoints.

Every attempt waits for a token from a shared rate limiter; transient failures — HTTP 429 (``retry-after-ms`` /
``Retry-After`` honoured), 408, 409, 5xx, connection errors and resets, timeouts, bodies slower than ``timeout_s`` in
total, and malformed JSON — are retried with exponential backoff and jitter. The API key is held privately, sent only
in the ``Authorization`` header, and scrubbed from every log line and exception message this module produces.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import httpx

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


class JudgeRequestError(RuntimeError):
    """A judge request failed for good (retries exhausted, or a non-retryable HTTP status)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JudgeAuthError(JudgeRequestError):
    """The endpoint rejected the credentials or the model (401, 403, 404): no item can be judged."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Secret:
    """Holds the API key; prints as ``'***'`` so it cannot leak through repr or vars()."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "'***'" if self._value else "None"

    __str__ = __repr__

    def reveal(self) -> str | None:
        return self._value


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta-seconds or an HTTP date), else ``None``."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = datetime.now(timezone.utc).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


class ChatClient:
    """Sends chat-completion requests with retries; thread-safe (one instance is shared by a judge's workers)."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 300.0,
        rate_limiter: Any | None = None,
        max_connections: int = 8,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self._api_key = _Secret(api_key if api_key is not None else os.environ.get("OPENAI_API_KEY"))
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.rate_limiter = rate_limiter
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout_s), limits=limits, transport=transport)

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.base_url!r}, api_key={self._api_key!r}, max_retries={self.max_retries})"

    def close(self) -> None:
        self._http.close()

    def redact(self, text: str) -> str:
        """``text`` with the API key (and any bearer token) masked."""
        key = self._api_key.reveal()
        if key:
            text = text.replace(key, "***")
        return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with equal jitter for retry number ``attempt`` (0-based)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2.0**attempt))
        return ceiling / 2.0 + random.uniform(0.0, ceiling / 2.0)

    def complete(self, payload: Mapping[str, Any]) -> str:
        """POST ``payload`` to ``/chat/completions`` and return the first choice's message content."""
        url = f"{self.base_url}/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = self._api_key.reveal()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps(payload).encode("utf-8")
        failure = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if self.rate_limiter is not None:
                self.rate_limiter.acquire()
            try:
                return self._attempt(url, headers, body)
            except _Transient as exc:
                failure = self.redact(exc.reason)
                retry_after = exc.retry_after
            if attempt == self.max_retries:
                break
            if retry_after is not None:
                delay = min(retry_after, self.max_retry_after_s) + random.uniform(0.0, 0.1 * self.backoff_base_s)
            else:
                delay = self.backoff(attempt)
            log.warning(
                "judge request failed (%s); retry %d/%d in %.2f s", failure, attempt + 1, self.max_retries, delay
            )
            time.sleep(delay)
        raise JudgeRequestError(f"judge request failed after {self.max_retries + 1} attempt(s): {failure}")

    def _attempt(self, url: str, headers: dict[str, str], body: bytes) -> str:
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._http.stream("POST", url, headers=headers, content=body) as response:
                chunks = []
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise _Transient(f"response body slower than {self.timeout_s:g} s")
                status = response.status_code
                data = b"".join(chunks)
                resp_headers = response.headers
        except httpx.TimeoutException as exc:
            raise _Transient(f"timeout ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection error ({type(exc).__name__}: {exc})") from None
        if status in _RETRY_STATUS:
            raise _Transient(f"HTTP {status}", retry_after=parse_retry_after(resp_headers))
        if status in (401, 403, 404):
            raise JudgeAuthError(f"HTTP {status} from {self.redact(url)}: {self._snippet(data)}", status=status)
        if status >= 400:
            raise JudgeRequestError(f"HTTP {status}: {self._snippet(data)}", status=status)
        try:
            parsed = json.loads(data)
            content = parsed["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise _Transient(f"malformed response body (HTTP {status}): {self._snippet(data)}") from None
        if not isinstance(content, str):
            raise _Transient(f"response without text content (HTTP {status})")
        return content

    def _snippet(self, data: bytes, limit: int = 200) -> str:
        text = data[:limit].decode("utf-8", errors="replace").replace("\n", " ")
        return self.redact(text)
