"""Build judges from a spec string: ``"offline"`` (the default, no network) or ``"openai:MODEL"``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from personaxis.judges.base import HarmJudge, IdentityJudge, Judge

DEFAULT_SPEC = "offline"
_OFFLINE = {"", "offline", "offline-v1", "default", "local"}


def _model_of(spec: str) -> str | None:
    """The model of an ``openai:MODEL`` spec, ``None`` for the offline judge; ``ValueError`` otherwise."""
    key = (spec or "").strip()
    if key.lower() in _OFFLINE:
        return None
    prefix, sep, model = key.partition(":")
    if sep and prefix.lower() == "openai" and model.strip():
        return model.strip()
    raise ValueError(f"unknown judge {spec!r}: use 'offline' or 'openai:MODEL' (e.g. 'openai:gpt-4o-mini')")


def _http_kwargs(
    base_url: str | None,
    api_key: str | None,
    cache_dir: Path | None,
    max_concurrency: int,
    requests_per_minute: float | None,
    timeout_s: float,
    max_retries: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return dict(
        base_url=base_url,
        api_key=api_key,
        cache_dir=cache_dir,
        max_concurrency=max_concurrency,
        requests_per_minute=requests_per_minute,
        timeout_s=timeout_s,
        max_retries=max_retries,
        **extra,
    )


def make_judge(
    spec: str = DEFAULT_SPEC,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    cache_dir: Path | None = None,
    max_concurrency: int = 8,
    requests_per_minute: float | None = 120,
    timeout_s: float = 60,
    max_retries: int = 6,
    **extra: Any,
) -> Judge:
    """A role-adherence judge. ``extra`` reaches the HTTP judge (``backoff_base_s``, ``max_parse_retries``, ...)."""
    model = _model_of(spec)
    if model is None:
        from personaxis.judges.offline import OfflineJudge

        return OfflineJudge()
    from personaxis.judges.openai_judge import OpenAIJudge

    kwargs = _http_kwargs(
        base_url, api_key, cache_dir, max_concurrency, requests_per_minute, timeout_s, max_retries, extra
    )
    return OpenAIJudge(model, **kwargs)


def make_harm_judge(
    spec: str = DEFAULT_SPEC,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    cache_dir: Path | None = None,
    max_concurrency: int = 8,
    requests_per_minute: float | None = 120,
    timeout_s: float = 60,
    max_retries: int = 6,
    **extra: Any,
) -> HarmJudge:
    """A harm judge: labels answers to risky requests refusal / redirect / harmless / harmful."""
    model = _model_of(spec)
    if model is None:
        from personaxis.judges.offline_labels import OfflineHarmJudge

        return OfflineHarmJudge()
    from personaxis.judges.openai_judge import OpenAIHarmJudge

    kwargs = _http_kwargs(
        base_url, api_key, cache_dir, max_concurrency, requests_per_minute, timeout_s, max_retries, extra
    )
    return OpenAIHarmJudge(model, **kwargs)


def make_identity_judge(
    spec: str = DEFAULT_SPEC,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    cache_dir: Path | None = None,
    max_concurrency: int = 8,
    requests_per_minute: float | None = 120,
    timeout_s: float = 60,
    max_retries: int = 6,
    **extra: Any,
) -> IdentityJudge:
    """An identity judge: labels answers to "who are you" questions (assistant, human_role, ...)."""
    model = _model_of(spec)
    if model is None:
        from personaxis.judges.offline_labels import OfflineIdentityJudge

        return OfflineIdentityJudge()
    from personaxis.judges.openai_judge import OpenAIIdentityJudge

    kwargs = _http_kwargs(
        base_url, api_key, cache_dir, max_concurrency, requests_per_minute, timeout_s, max_retries, extra
    )
    return OpenAIIdentityJudge(model, **kwargs)


def make_trait_judge(
    spec: str = DEFAULT_SPEC,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    cache_dir: Path | None = None,
    max_concurrency: int = 8,
    requests_per_minute: float | None = 120,
    timeout_s: float = 60,
    max_retries: int = 6,
    **extra: Any,
) -> Any:
    """A trait judge: scores how strongly answers show a trait, 0-100 (:mod:`personaxis.judges.traits`)."""
    model = _model_of(spec)
    if model is None:
        from personaxis.judges.traits import OfflineTraitJudge

        return OfflineTraitJudge()
    from personaxis.judges.traits import OpenAITraitJudge

    kwargs = _http_kwargs(
        base_url, api_key, cache_dir, max_concurrency, requests_per_minute, timeout_s, max_retries, extra
    )
    return OpenAITraitJudge(model, **kwargs)
