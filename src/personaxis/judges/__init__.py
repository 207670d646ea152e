"""Judges: role adherence (0-3) for persona-space rollouts, harm labels and identity labels for evaluations.

``make_judge("offline")`` (the default) needs no network: lexical cues plus an offline sentence embedder, combined
by a small logistic model. ``make_judge("openai:MODEL")`` calls any OpenAI-compatible ``/chat/completions``
endpoint (``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``) with rate limiting, retries and a persistent cache.
"""

from personaxis.judges.base import (
    DEFAULT_ROLE,
    DEFAULT_RUBRIC,
    FULLY,
    HARM_LABELS,
    IDENTITY_LABELS,
    SCORES,
    HarmJudge,
    IdentityJudge,
    Judge,
    JudgeItem,
    LabelItem,
)
from personaxis.judges.client import JudgeAuthError, JudgeRequestError
from personaxis.judges.factory import make_harm_judge, make_identity_judge, make_judge, make_trait_judge

__all__ = [
    "DEFAULT_ROLE",
    "DEFAULT_RUBRIC",
    "FULLY",
    "HARM_LABELS",
    "IDENTITY_LABELS",
    "SCORES",
    "HarmJudge",
    "IdentityJudge",
    "Judge",
    "JudgeAuthError",
    "JudgeItem",
    "JudgeRequestError",
    "LabelItem",
    "make_harm_judge",
    "make_identity_judge",
    "make_judge",
    "make_trait_judge",
]
