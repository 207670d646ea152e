"""``personaxis serve``: a local web app over a model and an axis.

Pages: chat with a live persona-drift chart, capping switch and steering slider (``/``); the persona space of a run
(``/space``); transcripts' trajectories side by side (``/transcripts``); the API reference (``/docs``, offline). The
JSON API lives under ``/api`` and an OpenAI-compatible endpoint under ``/v1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personaxis.web.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:  # import FastAPI only when the app is wanted
    if name == "create_app":
        from personaxis.web.app import create_app

        return create_app
    raise AttributeError(name)
