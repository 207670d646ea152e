"""The chat page's API: server info, answers (whole or streamed as server-sent events) and per-turn projections."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from personaxis.web import schemas
from personaxis.web.batcher import GuardSwitch
from personaxis.web.engine import Answer, StreamError
from personaxis.web.errors import ApiError, error_body
from personaxis.web.state import WebState, get_state
from personaxis.web.stream import StreamSettings, TokenStep

router = APIRouter(prefix="/api", tags=["chat"])
DEFAULT_MAX_TOKENS = 128

STREAM_DOC = """Stream an answer as server-sent events (`text/event-stream`), one event per token.

Events, each `event: NAME` then `data: JSON`:

- `start`: `{"layer", "cap", "alpha", "floor", "prompt_tokens"}`
- `token`: `{"delta", "n_tokens", "projection"}` — `projection` is the running mean projection of the answer so far,
  read from the forward pass that fed the token
- `guard`: `{"capping", "n_tokens", "projection"}` — guard mode (`cap: "auto"`) switched capping on or off after
  `n_tokens` tokens; `projection` is the mean over its window
- `done`: the same object as `POST /api/chat` returns
- `error`: `{"error": {"message", "code", ...}}` if generation failed after the stream began
"""


def _messages(body: schemas.ChatRequest | schemas.ProjectRequest, state: WebState) -> list[dict[str, str]]:
    messages = [m.model_dump() for m in body.messages]
    state.limits.check_messages(messages)
    return messages


def _settings(body: schemas.ChatRequest, state: WebState) -> StreamSettings:
    max_tokens = body.max_tokens or min(DEFAULT_MAX_TOKENS, state.limits.max_new_tokens)
    state.limits.check_new_tokens(max_tokens)
    return StreamSettings(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed)


def _chat_response(answer: Answer, state: WebState, cap: str | None, alpha: float) -> dict[str, Any]:
    service = state.service
    return {
        "text": answer.text,
        "prompt_tokens": answer.prompt_tokens,
        "new_tokens": answer.new_tokens,
        "stopped": answer.stopped,
        "projection": answer.projections[-1] if answer.projections else None,
        "projections": answer.projections,
        "layer": service.layer,
        "cap": cap,
        "alpha": alpha,
        "floor": service.floor(cap) if cap else service.floor(),
        "capped_tokens": answer.capped_tokens,
        "guard_switches": [guard_event(s) for s in answer.switches],
    }


def guard_event(switch: GuardSwitch) -> dict[str, Any]:
    return {"capping": switch.on, "n_tokens": switch.n_tokens, "projection": switch.projection}


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/info", response_model=schemas.InfoResponse, summary="Model, axis, capping experiments and limits")
def info(state: WebState = Depends(get_state)) -> dict[str, Any]:
    service = state.service
    profile = service.lm.profile
    experiments = [
        {"id": e, "layers": service.experiment_layers(e), "floor": service.floor(e)} for e in service.experiment_ids
    ]
    try:
        plan = service.guard_plan()
        guard = {
            "experiment": service.guard_experiment,
            "threshold": plan.threshold,
            "window": plan.window,
            "hysteresis": plan.hysteresis,
        }
    except ApiError:  # no capping config or no calibrated threshold: the page offers no guard mode
        guard = None
    return {
        "model": state.model_id,
        "n_layers": profile.n_layers,
        "hidden_size": profile.hidden_size,
        "layer": service.layer,
        "steer_layer": service.steer_layer,
        "axis_model": service.axis.model,
        "run_dir": str(state.run.root) if state.run.root is not None else None,
        "has_summary": state.run.summary is not None,
        "experiments": experiments,
        "default_cap": service.default_cap,
        "default_alpha": service.default_alpha,
        "raw_alpha": service.raw_alpha,
        "guard": guard,
        "floor": service.floor(),
        "reference": state.run.reference(),
        "limits": vars(state.limits),
    }


@router.post(
    "/chat",
    response_model=schemas.ChatResponse,
    responses=schemas.ERROR_RESPONSES,
    summary="Answer the conversation (whole answer, with per-turn projections)",
)
async def chat(body: schemas.ChatRequest, state: WebState = Depends(get_state)) -> dict[str, Any]:
    messages = _messages(body, state)
    settings = _settings(body, state)
    state.limits.check_token_budget(state.service.lm.tokenizer, [messages], new_tokens=settings.max_new_tokens)
    treatment = state.service.treatment(body.cap, body.alpha)
    answer = await state.service.answer(messages, treatment, settings)
    return _chat_response(answer, state, body.cap, treatment.alpha)


@router.post(
    "/chat/stream",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
        **schemas.ERROR_RESPONSES,
    },
    summary="Stream the answer token by token, with the running projection",
    description=STREAM_DOC,
    response_class=StreamingResponse,
)
async def chat_stream(body: schemas.ChatRequest, state: WebState = Depends(get_state)) -> StreamingResponse:
    messages = _messages(body, state)
    settings = _settings(body, state)
    service = state.service
    state.limits.check_token_budget(service.lm.tokenizer, [messages], new_tokens=settings.max_new_tokens)
    treatment = service.treatment(body.cap, body.alpha)
    prepared = await service.prepare(messages, settings.max_new_tokens)
    items = await service.open_stream(prepared, treatment, settings)

    async def events() -> AsyncIterator[str]:
        floor = service.floor(body.cap) if body.cap else service.floor()
        yield sse(
            "start",
            {
                "layer": service.layer,
                "cap": body.cap,
                "alpha": treatment.alpha,
                "floor": floor,
                "prompt_tokens": len(prepared[1]),
            },
        )
        async for item in items:
            if isinstance(item, TokenStep):
                yield sse("token", {"delta": item.delta, "n_tokens": item.n_tokens, "projection": item.projection})
            elif isinstance(item, GuardSwitch):
                yield sse("guard", guard_event(item))
            elif isinstance(item, Answer):
                yield sse(
                    "done",
                    {
                        **_chat_response(item, state, body.cap, treatment.alpha),
                        "running_projection": item.running_projection,
                    },
                )
            elif isinstance(item, StreamError):
                yield sse("error", error_body(item.status, item.message))

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.post(
    "/project",
    response_model=schemas.ProjectResponse,
    responses=schemas.ERROR_RESPONSES,
    summary="Per-turn projections of a conversation (teacher-forced, one pass)",
)
async def project(body: schemas.ProjectRequest, state: WebState = Depends(get_state)) -> dict[str, Any]:
    messages = _messages(body, state)
    service = state.service
    state.limits.check_token_budget(service.lm.tokenizer, [messages])
    treatment = service.treatment(body.cap, body.alpha)
    from personaxis.chat import ConversationError, validate_conversation

    try:
        conversation = validate_conversation(messages, require_assistant=True)
        projections = await service.call(service.project_locked, conversation, treatment)
    except ConversationError as exc:
        raise ApiError(422, str(exc), param="messages") from None
    except ValueError as exc:  # MonitorError and context limits
        raise ApiError(422, str(exc), param="messages") from None
    return {"projections": projections, "layer": service.layer, "cap": body.cap, "alpha": treatment.alpha}
