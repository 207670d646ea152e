"""The app factory: pages, static assets, the JSON API, the OpenAI-compatible endpoint, limits and error handling.

    app = create_app(load_model(), load_axis("runs/quick/axis.safetensors"), run_dir="runs/quick")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every asset the pages use is served from ``personaxis/web/static`` (no CDN; the Content-Security-Policy header
forbids any other origin). ``/docs`` is an offline page that renders ``/openapi.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from personaxis.axis import Axis
from personaxis.models import LoadedModel
from personaxis.web import openai_api, routes_chat, routes_metrics, routes_space, routes_transcripts
from personaxis.web.batcher import BatcherConfig
from personaxis.web.engine import ModelService
from personaxis.web.errors import install_error_handlers
from personaxis.web.limits import BodySizeLimit, Limits
from personaxis.web.run_data import RunData
from personaxis.web.state import WebState

STATIC_DIR = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/space": "space.html", "/transcripts": "transcripts.html", "/docs": "docs.html"}
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]

DESCRIPTION = """Chat with a model while watching its projection on the Assistant Axis, cap or steer it, explore the
persona space of a run, and compare transcripts' trajectories. Errors are JSON: `{"error": {"message", "type",
"code", "param"}}`. `/v1/chat/completions` speaks the OpenAI protocol, with the extension field
`personaxis: {"cap", "alpha"}` in requests and `personaxis: {"projections", "layer", ...}` in responses; `cap: "auto"`
is guard mode (capping switched on only while the answer's projection drifts below the calibrated floor).
Concurrent requests are batched (continuous batching, each request with its own treatment); a full queue answers 429
with `Retry-After`. `/v1/completions` completes plain text; `/metrics` gives the counters in Prometheus' format."""


class SecurityHeaders:
    """Adds a strict Content-Security-Policy (nothing from other origins) and related headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *(h for h in SECURITY_HEADERS if h[0] not in present),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


def _page(name: str) -> Any:
    path = STATIC_DIR / name

    def page() -> FileResponse:
        return FileResponse(path, media_type="text/html", headers={"Cache-Control": "no-cache"})

    return page


def create_app(
    lm: LoadedModel,
    axis: Axis,
    capping: Any | None = None,
    run_dir: str | Path | None = None,
    *,
    transcripts_dir: str | Path | None = None,
    layer: int | None = None,
    default_cap: str | None = None,
    default_alpha: float = 0.0,
    raw_alpha: bool = False,
    limits: Limits | None = None,
    allowed_hosts: list[str] | None = None,
    model_id: str | None = None,
    batcher: BatcherConfig | None = None,
    guard_experiment: str | None = None,
    guard_window: int = 8,
    guard_hysteresis: float | None = None,
) -> FastAPI:
    """A FastAPI app over one model and axis.

    ``capping`` is a :class:`personaxis.capping.CappingConfig` (or any object with ``experiment_ids``,
    ``interventions(id)`` and optionally ``floor(layer, percentile)``); ``run_dir`` holds ``summary.json`` and the
    rollouts the persona-space page shows; ``transcripts_dir`` (default ``RUN/transcripts``) the transcripts the
    transcripts page offers. ``layer`` is the monitored (and steered) layer, the axis' target layer by default.
    ``raw_alpha`` takes every α (the default and per request) as the reference's coefficient of the stored axis row.
    ``allowed_hosts`` restricts the Host header (against DNS rebinding when bound to 127.0.0.1). ``batcher`` sets
    the continuous batching (rows, queue, cache budget, timeout; ``max_batch=1`` serves one request at a time);
    ``guard_*`` set guard mode (``cap: "auto"``): the experiment switched on, the window of tokens whose mean
    projection is compared with the calibrated floor, and the margin above it that switches capping off again.
    """
    limits = limits or Limits()
    service = ModelService(
        lm,
        axis,
        capping,
        layer=layer,
        default_cap=default_cap,
        default_alpha=default_alpha,
        batcher=batcher,
        guard_experiment=guard_experiment,
        guard_window=guard_window,
        guard_hysteresis=guard_hysteresis,
        raw_alpha=raw_alpha,
    )
    app = FastAPI(
        title="personaxis",
        version=_version(),
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.px = WebState(
        service=service,
        run=RunData(run_dir, transcripts_dir),
        limits=limits,
        model_id=model_id or lm.profile.name,
        created=int(time.time()),
    )
    install_error_handlers(app)
    app.router.on_shutdown.append(service.close)
    for router in (
        routes_chat.router,
        routes_space.router,
        routes_transcripts.router,
        openai_api.router,
        routes_metrics.router,
    ):
        app.include_router(router)
    for route, name in PAGES.items():
        app.add_api_route(route, _page(name), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=False), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("personaxis")
    except Exception:  # pragma: no cover - running from a source tree
        return "0"
