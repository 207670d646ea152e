"""Programmatic scoring for the capability set: numeric answers to word problems, and instruction checks.

Numeric parsing prefers an explicit final answer ("the answer is 42", "= 42", "**42**"), else takes the last number
in the text; thousands separators and a trailing ``.0`` are accepted. Instruction checks follow IFEval's spirit:
exact, programmatic, no judge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"
_EXPLICIT = (
    re.compile(rf"answer\s*(?:is|:|=)?\s*(?:about\s*)?\**\$?\s*({_NUMBER})", re.IGNORECASE),
    re.compile(rf"\*\*\$?\s*({_NUMBER})\s*\**", re.IGNORECASE),
    re.compile(rf"=\s*\$?\s*({_NUMBER})\s*(?:[a-z]+\s*)?\.?\s*$", re.IGNORECASE | re.MULTILINE),
)
_ANY_NUMBER = re.compile(_NUMBER)
_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
_EDGE = " \t\n\r\"'*`_"
CHECK_TYPES = (
    "max_words",
    "min_words",
    "contains",
    "not_contains",
    "all_lowercase",
    "all_uppercase",
    "starts_with",
    "ends_with",
    "bullet_count",
    "no_commas",
    "json",
)


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_number(text: str) -> float | None:
    """The final numeric answer in ``text``, or ``None`` when there is no number."""
    text = text or ""
    for pattern in _EXPLICIT:
        matches = pattern.findall(text)
        if matches:
            return _to_float(matches[-1])
    numbers = _ANY_NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def arithmetic_correct(answer_text: str, expected: float) -> tuple[bool, float | None]:
    parsed = parse_number(answer_text)
    return (parsed is not None and abs(parsed - float(expected)) < 1e-6), parsed


def _words(text: str) -> list[str]:
    return re.findall(r"\b[\w'-]+\b", text)


def _strip_fences(text: str) -> str:
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL | re.IGNORECASE)
    return fenced.group(1) if fenced else text


def check_instruction(check: Mapping[str, Any], text: str) -> bool:
    """Whether ``text`` satisfies one check (``{"type": ..., "n"/"text": ...}``); unknown types raise."""
    kind = check.get("type")
    text = text or ""
    if kind == "max_words":
        return len(_words(text)) <= int(check["n"])
    if kind == "min_words":
        return len(_words(text)) >= int(check["n"])
    if kind == "contains":
        return str(check["text"]).lower() in text.lower()
    if kind == "not_contains":
        return str(check["text"]).lower() not in text.lower()
    if kind == "all_lowercase":
        return any(c.isalpha() for c in text) and text == text.lower()
    if kind == "all_uppercase":
        return any(c.isalpha() for c in text) and text == text.upper()
    if kind == "starts_with":
        return text.lstrip(_EDGE).startswith(str(check["text"]))
    if kind == "ends_with":
        target = str(check["text"]).rstrip(_EDGE)
        return text.rstrip(_EDGE).endswith(target)
    if kind == "bullet_count":
        return len(_BULLET.findall(text)) == int(check["n"])
    if kind == "no_commas":
        return bool(text.strip()) and "," not in text
    if kind == "json":
        try:
            json.loads(_strip_fences(text))
        except ValueError:
            return False
        return True
    raise ValueError(f"unknown instruction check type {kind!r}; known: {', '.join(CHECK_TYPES)}")
