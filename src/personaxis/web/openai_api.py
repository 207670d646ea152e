"""An OpenAI-compatible endpoint: ``POST /v1/chat/completions`` (streaming and not) and ``GET /v1/models``.

The served model runs with a capping experiment and/or steering applied: the server's defaults (``serve --cap``,
``--alpha``), or per request through the extension field ``"personaxis": {"cap": id | null, "alpha": float}`` (with
the ``openai`` client: ``extra_body={"personaxis": {...}}``). Every response carries the per-turn projections of the
conversation, the new answer last, in the extra field ``"personaxis": {"projections": [...], "layer": l, ...}``; in a
stream, every chunk carries the running projection and the last chunk the per-turn projections.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from personaxis.validate import field
from personaxis.web.engine import Answer, StreamError, Treatment
from personaxis.web.errors import ApiError
from personaxis.web.schemas import ERROR_RESPONSES
from personaxis.web.state import WebState, get_state
from personaxis.web.stream import StreamSettings, TokenStep

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

DEFAULT_MAX_TOKENS = 256


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class PersonaxisOptions(BaseModel):
    cap: str | None = Field(None, description="Capping experiment id, or null for none (omitted: the server default).")
    alpha: float | None = field("alpha", None, description="Steering coefficient (omitted: the server default).")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 64,
        "personaxis": {"cap": None, "alpha": 0.0}}})

    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = field("temperature", None, le=2.0, description="Default 0 (greedy).")
    top_p: float | None = field("top_p", None)
    n: int | None = Field(None, ge=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = field("seed", None)
    personaxis: PersonaxisOptions | None = None


class ProjectionInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    projections: list[float | None] = Field(description="Per assistant turn, the new answer last.")
    projection: float | None
    layer: int
    cap: str | None
    alpha: float
    floor: float | None


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    personaxis: ProjectionInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "personaxis"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _text(message: OpenAIMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(422, f"messages.{index}.content: only text parts are supported", param=f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise ApiError(422, f"messages.{i}.role: {message.role!r} is not supported (system, developer, user, "
                                "assistant)", param=f"messages.{i}.role")
        out.append({"role": role, "content": _text(message, i)})
    return out


def _treatment(body: ChatCompletionRequest, state: WebState) -> Treatment:
    service = state.service
    options = body.personaxis
    cap = options.cap if options is not None and "cap" in options.model_fields_set else service.default_cap
    alpha = options.alpha if options is not None and options.alpha is not None else service.default_alpha
    return service.treatment(cap, alpha)


def _settings(body: ChatCompletionRequest, state: WebState) -> StreamSettings:
    if body.n not in (None, 1):
        raise ApiError(422, f"n = {body.n}: this server returns one choice per request", param="n")
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = requested or min(DEFAULT_MAX_TOKENS, state.limits.max_new_tokens)
    state.limits.check_new_tokens(max_tokens, param="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(422, "stop: up to 4 non-empty strings", param="stop")
    return StreamSettings(max_new_tokens=max_tokens, temperature=body.temperature or 0.0,
                          top_p=body.top_p if body.top_p is not None else 1.0,
                          seed=body.seed if body.seed is not None else 0, stop=tuple(stop))


def _info(answer: Answer, treatment: Treatment, state: WebState) -> dict[str, Any]:
    service = state.service
    return {"projections": answer.projections, "projection": answer.projections[-1] if answer.projections else None,
            "layer": service.layer, "cap": treatment.cap, "alpha": treatment.alpha,
            "floor": service.floor(treatment.cap) if treatment.cap else service.floor()}


def _usage(answer: Answer) -> dict[str, int]:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens,
            "total_tokens": answer.prompt_tokens + answer.new_tokens}


@router.get("/models", response_model=ModelList, summary="The served model")
def models(state: WebState = Depends(get_state)) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                        "owned_by": "personaxis"}]}


@router.post("/chat/completions", response_model=ChatCompletion, responses={
    200: {"content": {"text/event-stream": {}}, "description": "A completion, or chunks as server-sent events when "
          "`stream` is true"}, **ERROR_RESPONSES}, summary="OpenAI-compatible chat completion (with capping/steering)")
async def chat_completions(body: ChatCompletionRequest, state: WebState = Depends(get_state)) -> Any:
    messages = _messages(body)
    state.limits.check_messages(messages)
    settings = _settings(body, state)
    treatment = _treatment(body, state)
    service = state.service
    state.limits.check_token_budget(service.lm.tokenizer, [messages], new_tokens=settings.max_new_tokens)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.stream:
        answer = await service.answer(messages, treatment, settings)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": "stop" if answer.stopped else "length", "logprobs": None}],
                "usage": _usage(answer), "personaxis": _info(answer, treatment, state)}

    prepared = await service.prepare(messages, settings.max_new_tokens)
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        async for item in service.stream(prepared, treatment, settings):
            if isinstance(item, TokenStep):
                if item.delta:
                    yield chunk({"content": item.delta}, personaxis={"running_projection": item.projection})
            elif isinstance(item, Answer):
                yield chunk({}, "stop" if item.stopped else "length", personaxis=_info(item, treatment, state))
                if include_usage:
                    data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": state.model_id, "choices": [], "usage": _usage(item)}
                    yield f"data: {json.dumps(data)}\n\n"
            elif isinstance(item, StreamError):
                yield f"data: {json.dumps({'error': {'message': item.message, 'code': item.status}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
