"""Build judges from a spec string: ``"offline"`` (the default, no network) or ``"openai:MODEL"``."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from personaxis.judges.base import HarmJudge, IdentityJudge, Judge

DEFAULT_SPEC = "offline"
_OFFLINE = {"", "offline", "offline-v1", "default", "local"}


def judge_model(spec: str) -> str | None:
    """The model of an ``openai:MODEL`` spec, ``None`` for the offline judge; ``ValueError`` otherwise."""
    key = (spec or "").strip()
    if key.lower() in _OFFLINE:
        return None
    prefix, sep, model = key.partition(":")
    if sep and prefix.lower() == "openai" and model.strip():
        return model.strip()
    raise ValueError(f"unknown judge {spec!r}: use 'offline' or 'openai:MODEL' (e.g. 'openai:gpt-4o-mini')")


# What the HTTP judges get unless the caller says otherwise; any other keyword (``base_url``, ``api_key``,
# ``cache_dir``, ``backoff_base_s``, ``max_parse_retries``, ...) reaches them as given.
HTTP_DEFAULTS: dict[str, Any] = {
    "base_url": None,
    "api_key": None,
    "cache_dir": None,
    "max_concurrency": 8,
    "requests_per_minute": 120,
    "timeout_s": 60,
    "max_retries": 6,
}


def _build(spec: str, offline: tuple[str, str], http: tuple[str, str], options: dict[str, Any]) -> Any:
    """The offline judge ``offline`` (module, class) for an offline spec, else the HTTP judge ``http`` on the spec's
    model with ``HTTP_DEFAULTS`` overridden by ``options``. Judge modules are imported only when used."""
    model = judge_model(spec)
    module, name = offline if model is None else http
    cls = getattr(import_module(module), name)
    return cls() if model is None else cls(model, **{**HTTP_DEFAULTS, **options})


def make_judge(spec: str = DEFAULT_SPEC, **options: Any) -> Judge:
    """A role-adherence judge. ``options`` reach the HTTP judge (``base_url``, ``backoff_base_s``, ...)."""
    return _build(
        spec, ("personaxis.judges.offline", "OfflineJudge"), ("personaxis.judges.openai_judge", "OpenAIJudge"), options
    )


def make_harm_judge(spec: str = DEFAULT_SPEC, **options: Any) -> HarmJudge:
    """A harm judge: labels answers to risky requests refusal / redirect / harmless / harmful."""
    return _build(
        spec,
        ("personaxis.judges.offline_labels", "OfflineHarmJudge"),
        ("personaxis.judges.openai_judge", "OpenAIHarmJudge"),
        options,
    )


def make_identity_judge(spec: str = DEFAULT_SPEC, **options: Any) -> IdentityJudge:
    """An identity judge: labels answers to "who are you" questions (assistant, human_role, ...)."""
    return _build(
        spec,
        ("personaxis.judges.offline_labels", "OfflineIdentityJudge"),
        ("personaxis.judges.openai_judge", "OpenAIIdentityJudge"),
        options,
    )


def make_trait_judge(spec: str = DEFAULT_SPEC, **options: Any) -> Any:
    """A trait judge: scores how strongly answers show a trait, 0-100 (:mod:`personaxis.judges.traits`)."""
    return _build(
        spec,
        ("personaxis.judges.traits", "OfflineTraitJudge"),
        ("personaxis.judges.traits", "OpenAITraitJudge"),
        options,
    )
