"""A persistent, append-only judgement cache: one JSON line per judged prompt, safe across threads and processes.

Each line is ``{"judge": name, "hash": prompt_hash, "key": item_key, "value": ..., "reply": ...}`` and is written
with a single ``write`` on a file opened with ``O_APPEND``, so concurrent writers (threads or processes) never
interleave lines, and a crash can at worst leave one torn last line, which is skipped on load (the next writer
starts a fresh line after it). Entries are looked up
by ``(judge name, prompt hash)``: the hash covers the exact messages sent, so a changed prompt, rubric or answer is
judged afresh and an unchanged one is never paid for twice. Failed judgements are not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def prompt_hash(payload: Mapping[str, Any]) -> str:
    """A stable hash of a request payload (model, messages, options) — never include credentials in it."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "judge"


class JudgeCache:
    """Judgements of one judge (``name``) for one task, in ``<directory>/<task>--<name>.jsonl``."""

    def __init__(self, directory: Path, name: str, task: str) -> None:
        self.name = name
        self.path = Path(directory) / f"{_slug(task)}--{_slug(name)}.jsonl"
        self._lock = threading.Lock()
        self._entries: dict[str, Any] = {}
        self._torn_tail = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reload()

    def __repr__(self) -> str:
        return f"JudgeCache(path={str(self.path)!r}, entries={len(self._entries)})"

    def __len__(self) -> int:
        return len(self._entries)

    def reload(self) -> None:
        """Read every complete line of the file (lines written by other processes included)."""
        with self._lock:
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return
            self._torn_tail = bool(data) and not data.endswith(b"\n")
            torn = 0
            for line in data.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    if entry.get("judge") == self.name and isinstance(entry.get("hash"), str):
                        self._entries[entry["hash"]] = entry.get("value")
                except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                    torn += 1
            if torn:
                log.warning("judge cache %s: skipped %d unreadable line(s)", self.path, torn)

    def get(self, digest: str) -> Any | None:
        with self._lock:
            return self._entries.get(digest)

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def put(self, digest: str, key: str, value: Any, reply: str | None = None) -> None:
        """Record a judgement: one atomic appended line, flushed to the OS before returning."""
        entry = {"judge": self.name, "hash": digest, "key": key, "value": value}
        if reply is not None:
            entry["reply"] = reply[:2000]
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self._torn_tail:
                line = b"\n" + line  # a previous writer died mid-line: start a fresh one
                self._torn_tail = False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                if written != len(line):  # pragma: no cover - regular files write whole small buffers
                    raise OSError(f"short write to {self.path}")
            finally:
                os.close(fd)
            self._entries[digest] = value
