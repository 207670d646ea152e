"""Judges backed by an OpenAI-compatible chat endpoint: role adherence (0-3), harm labels, identity labels.

Items are judged concurrently by a bounded thread pool under a shared requests-per-minute limit. Each judgement is
appended to a persistent cache as soon as it arrives, so an interrupted run loses nothing and a rerun — in this
process or another — pays for nothing already judged. A reply that holds no valid score or label is asked again up
to ``max_parse_retries`` times, then the item comes back ``None``; so does an item whose requests keep failing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from personaxis.judges.base import JudgeItem, LabelItem, check_unique_keys
from personaxis.judges.cache import JudgeCache, prompt_hash
from personaxis.judges.client import ChatClient, JudgeAuthError, JudgeRequestError
from personaxis.judges.prompts import (
    PROMPT_VERSION,
    Messages,
    harm_messages,
    identity_messages,
    parse_harm_label,
    parse_identity_label,
    parse_reference_score,
    parse_score,
    reference_messages,
    role_messages,
)
from personaxis.judges.ratelimit import TokenBucket
from personaxis.progress import progress_bar

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT", JudgeItem, LabelItem)
ValueT = TypeVar("ValueT", int, str)


def default_cache_dir() -> Path:
    from personaxis.models import cache_dir

    return cache_dir() / "judges"


class HttpJudge(Generic[ItemT, ValueT]):
    """Shared machinery: cache lookup, de-duplication, the worker pool, parse retries."""

    task = "base"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        cache_dir: Path | None = None,
        max_concurrency: int = 8,
        requests_per_minute: float | None = 120,
        timeout_s: float = 60,
        max_retries: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_parse_retries: int = 2,
        max_tokens: int | None = 32,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not model:
            raise ValueError("an OpenAI-compatible judge needs a model name, e.g. 'openai:gpt-4o-mini'")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.model = model
        self.name = f"openai:{model}"
        self.max_concurrency = max_concurrency
        self.max_parse_retries = max_parse_retries
        self.max_tokens = max_tokens
        limiter = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.client = ChatClient(
            base_url=base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            rate_limiter=limiter,
            max_connections=max_concurrency,
            transport=transport,
        )
        self.cache = JudgeCache(cache_dir if cache_dir is not None else default_cache_dir(), self.name, self.task)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.client.base_url!r}, cache={self.cache!r})"

    def close(self) -> None:
        self.client.close()

    # Subclasses define what is asked and how the answer is read.
    def _messages(self, item: ItemT) -> Messages:
        raise NotImplementedError

    def _parse(self, reply: str) -> ValueT | None:
        raise NotImplementedError

    def _parser(self, item: ItemT) -> Callable[[str], ValueT | None]:
        """How the reply about ``item`` is read (one way per judge unless a subclass says otherwise)."""
        return self._parse

    def _payload(self, item: ItemT) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model, "messages": self._messages(item), "temperature": 0}
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        return payload

    def _run(self, items: Sequence[ItemT], show_progress: bool) -> dict[str, ValueT | None]:
        check_unique_keys(items)
        results: dict[str, ValueT | None] = {}
        todo: dict[str, tuple[dict[str, Any], list[str], Callable[[str], Any]]] = {}  # digest -> (payload, keys, parse)
        for item in items:
            payload = self._payload(item)
            digest = prompt_hash({"task": self.task, "version": PROMPT_VERSION, "request": payload})
            cached = self.cache.get(digest)
            if cached is not None:
                results[item.key] = cached
            elif digest in todo:
                todo[digest][1].append(item.key)
            else:
                todo[digest] = (payload, [item.key], self._parser(item))
        if todo:
            log.info("%s: %d cached, %d to judge", self.name, len(results), sum(len(k) for _, k, _ in todo.values()))
        stop = threading.Event()
        bar = progress_bar(total=len(items), desc=f"judge ({self.task})", unit="item", disable=not show_progress)
        bar.update(len(results))
        try:
            with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="judge") as pool:
                futures = {
                    pool.submit(self._judge_one, digest, payload, keys[0], stop, parse): keys
                    for digest, (payload, keys, parse) in todo.items()
                }
                for future in as_completed(futures):
                    keys = futures[future]
                    try:
                        value = future.result()
                    except JudgeAuthError:
                        stop.set()
                        for other in futures:
                            other.cancel()
                        raise
                    for key in keys:
                        results[key] = value
                    bar.update(len(keys))
        finally:
            bar.close()
        failed = sum(1 for item in items if results.get(item.key) is None)
        if failed:
            log.warning("%s: %d of %d item(s) could not be judged", self.name, failed, len(items))
        return {item.key: results.get(item.key) for item in items}

    def _judge_one(
        self, digest: str, payload: dict[str, Any], key: str, stop: threading.Event, parse: Callable[[str], Any]
    ) -> ValueT | None:
        for attempt in range(self.max_parse_retries + 1):
            if stop.is_set():
                return None
            try:
                reply = self.client.complete(payload)
            except JudgeAuthError:
                raise
            except JudgeRequestError as exc:
                log.warning("%s: item %r not judged: %s", self.name, key, exc)
                return None
            value = parse(reply)
            if value is not None:
                self.cache.put(digest, key, value, reply=self.client.redact(reply))
                return value
            log.warning(
                "%s: unusable reply for item %r (try %d/%d): %r",
                self.name,
                key,
                attempt + 1,
                self.max_parse_retries + 1,
                self.client.redact(reply[:120]),
            )
        return None


class OpenAIJudge(HttpJudge[JudgeItem, int]):
    """Role-adherence judge: scores each rollout 0..3 per its role's rubric, or, for a role that brings the
    reference's judge prompt (``item.eval_prompt``), exactly as the reference does: that prompt filled with the
    question and answer is the only message, and the score is the reply's first whole number in 0..3."""

    task = "role"

    def _messages(self, item: JudgeItem) -> Messages:
        return reference_messages(item) if item.eval_prompt else role_messages(item)

    def _parse(self, reply: str) -> int | None:
        return parse_score(reply)

    def _parser(self, item: JudgeItem) -> Callable[[str], int | None]:
        return parse_reference_score if item.eval_prompt else parse_score

    def score(self, items: Sequence[JudgeItem], *, show_progress: bool = False) -> dict[str, int | None]:
        return self._run(items, show_progress)


class _LabelJudge(HttpJudge[LabelItem, str]):
    def label(self, items: Sequence[LabelItem], *, show_progress: bool = False) -> dict[str, str | None]:
        return self._run(items, show_progress)


class OpenAIHarmJudge(_LabelJudge):
    """Labels answers to risky requests: refusal, redirect, harmless, harmful."""

    task = "harm"

    def _messages(self, item: LabelItem) -> Messages:
        return harm_messages(item)

    def _parse(self, reply: str) -> str | None:
        return parse_harm_label(reply)


class OpenAIIdentityJudge(_LabelJudge):
    """Labels answers to identity questions: assistant, human_role, nonhuman_role, mystical, nonsense."""

    task = "identity"

    def _messages(self, item: LabelItem) -> Messages:
        return identity_messages(item)

    def _parse(self, reply: str) -> str | None:
        return parse_identity_label(reply)
