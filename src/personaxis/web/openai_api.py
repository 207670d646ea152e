"""An OpenAI-compatible endpoint: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming and not) and
``GET /v1/models``.

The served model runs with a capping experiment and/or steering applied: the server's defaults (``serve --cap``,
``--alpha``), or per request through the extension field ``"personaxis": {"cap": id | "auto" | null, "alpha": float}``
(with the ``openai`` client: ``extra_body={"personaxis": {...}}``); ``"auto"`` is guard mode, capping only while the
answer drifts. Every chat response carries the per-turn projections of the conversation, the new answer last, in the
extra field ``"personaxis": {"projections": [...], "layer": l, ...}``; in a stream, every chunk carries the running
projection (from the forward pass that fed the token), a guard switch comes as a chunk with an empty delta and
``"personaxis": {"guard": {...}}``, and the last chunk carries the per-turn projections.

The default temperature is OpenAI's, 1.0 (sampled, seeded by ``seed``, 0 when omitted); send ``temperature: 0`` for
greedy answers. Fields the server does not implement (tools, logprobs, response formats, penalties, ...) are a 400.
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
from personaxis.web.batcher import GuardSwitch
from personaxis.web.engine import Answer, StreamError, Treatment
from personaxis.web.errors import ApiError, error_body
from personaxis.web.schemas import ERROR_RESPONSES
from personaxis.web.state import WebState, get_state
from personaxis.web.stream import StreamSettings, TokenStep

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

DEFAULT_MAX_TOKENS = 256
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default

# Request fields of OpenAI's API this server does not implement, with the value that means "not used".
UNSUPPORTED: dict[str, Any] = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
    "logprobs": (None, False),
    "top_logprobs": None,
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "audio": None,
    "modalities": (None, ["text"]),
    "prediction": None,
    "web_search_options": None,
    "echo": (None, False),
    "suffix": None,
    "best_of": (None, 1),
    "repetition_penalty": (None, 1, 1.0),
}


def check_unsupported(body: BaseModel) -> None:
    """A 400 naming the first field that asks for something this server does not do."""
    given = {**(body.model_extra or {}), **{k: getattr(body, k) for k in body.model_fields_set}}
    for name, unused in UNSUPPORTED.items():
        if name in given:
            allowed = unused if isinstance(unused, tuple) else (unused,)
            if not any(given[name] == a for a in allowed):
                raise ApiError(400, f"{name} is not supported by this server", param=name)


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class PersonaxisOptions(BaseModel):
    cap: str | None = Field(
        None, description='Capping experiment id, "auto" (guard mode), or null for none (omitted: the server default).'
    )
    alpha: float | None = field("alpha", None, description="Steering coefficient (omitted: the server default).")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "Who are you?"}],
                "max_tokens": 64,
                "personaxis": {"cap": None, "alpha": 0.0},
            }
        },
    )

    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = field("temperature", None, le=2.0, description="Default 1.0 (OpenAI's); 0 is greedy.")
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
            raise ApiError(
                422, f"messages.{index}.content: only text parts are supported", param=f"messages.{index}.content"
            )
        parts.append(part["text"])
    return "".join(parts)


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise ApiError(
                422,
                f"messages.{i}.role: {message.role!r} is not supported (system, developer, user, assistant)",
                param=f"messages.{i}.role",
            )
        out.append({"role": role, "content": _text(message, i)})
    return out


def _treatment(body: ChatCompletionRequest | CompletionRequest, state: WebState) -> Treatment:
    service = state.service
    options = body.personaxis
    cap = options.cap if options is not None and "cap" in options.model_fields_set else service.default_cap
    alpha = options.alpha if options is not None and options.alpha is not None else service.default_alpha
    return service.treatment(cap, alpha)


def _settings(
    body: ChatCompletionRequest | CompletionRequest, state: WebState, default_tokens: int = DEFAULT_MAX_TOKENS
) -> StreamSettings:
    check_unsupported(body)
    if body.n not in (None, 1):
        raise ApiError(422, f"n = {body.n}: this server returns one choice per request", param="n")
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    max_tokens = requested or min(default_tokens, state.limits.max_new_tokens)
    state.limits.check_new_tokens(
        max_tokens, param="max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(422, "stop: up to 4 non-empty strings", param="stop")
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    return StreamSettings(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed if body.seed is not None else 0,
        stop=tuple(stop),
    )


def _info(answer: Answer, treatment: Treatment, state: WebState) -> dict[str, Any]:
    service = state.service
    return {
        "projections": answer.projections,
        "projection": answer.projections[-1] if answer.projections else None,
        "running_projection": answer.running_projection,
        "layer": service.layer,
        "cap": treatment.cap,
        "alpha": treatment.alpha,
        "floor": service.floor(treatment.cap) if treatment.cap else service.floor(),
        "capped_tokens": answer.capped_tokens,
        "guard_switches": [_guard(s) for s in answer.switches],
    }


def _guard(switch: GuardSwitch) -> dict[str, Any]:
    return {"capping": switch.on, "n_tokens": switch.n_tokens, "projection": switch.projection}


def _stream_error(item: StreamError) -> str:
    return f"data: {json.dumps(error_body(item.status, item.message))}\n\n"


def _usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.new_tokens,
        "total_tokens": answer.prompt_tokens + answer.new_tokens,
    }


def _streaming_responses(description: str) -> dict[int | str, dict[str, Any]]:
    """The documented responses of a route that answers JSON, or server-sent events when ``stream`` is true."""
    return {
        200: {"content": {"text/event-stream": {}}, "description": description},
        429: {"description": "Too many requests waiting (see Retry-After)"},
        **ERROR_RESPONSES,
    }


@router.get("/models", response_model=ModelList, summary="The served model")
def models(state: WebState = Depends(get_state)) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": state.created, "owned_by": "personaxis"}],
    }


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=_streaming_responses("A completion, or chunks as server-sent events when `stream` is true"),
    summary="OpenAI-compatible chat completion (with capping/steering/guard mode)",
)
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
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": state.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": "stop" if answer.stopped else "length",
                    "logprobs": None,
                }
            ],
            "usage": _usage(answer),
            "personaxis": _info(answer, treatment, state),
        }

    prepared = await service.prepare(messages, settings.max_new_tokens)
    items = await service.open_stream(prepared, treatment, settings)
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.model_id,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        async for item in items:
            if isinstance(item, TokenStep):
                if item.delta:
                    yield chunk({"content": item.delta}, personaxis={"running_projection": item.projection})
            elif isinstance(item, GuardSwitch):
                yield chunk({}, personaxis={"guard": _guard(item)})
            elif isinstance(item, Answer):
                yield chunk({}, "stop" if item.stopped else "length", personaxis=_info(item, treatment, state))
                if include_usage:
                    yield chunk(None, usage=_usage(item))
            elif isinstance(item, StreamError):
                yield _stream_error(item)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class CompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {
                "model": "SmolLM2-135M-Instruct",
                "prompt": "The capital of France is",
                "max_tokens": 16,
                "temperature": 0,
            }
        },
    )

    model: str
    prompt: str | list[str] = Field(description="One prompt (a list of one string is accepted).")
    max_tokens: int | None = Field(None, ge=1, description="Default 16 (OpenAI's).")
    temperature: float | None = field("temperature", None, le=2.0, description="Default 1.0 (OpenAI's); 0 is greedy.")
    top_p: float | None = field("top_p", None)
    n: int | None = Field(None, ge=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = field("seed", None)
    personaxis: PersonaxisOptions | None = None


def _prompt_text(body: CompletionRequest, state: WebState) -> str:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(
                400, f"prompt: this server completes one prompt per request, got {len(prompt)}", param="prompt"
            )
        prompt = prompt[0]
    if not prompt:
        raise ApiError(422, "prompt: empty", param="prompt")
    if len(prompt) > state.limits.max_message_chars:
        raise ApiError(
            422,
            f"prompt: {len(prompt)} characters, more than the limit of {state.limits.max_message_chars}",
            param="prompt",
        )
    return prompt


@router.post(
    "/completions",
    responses=_streaming_responses("A text completion, or chunks when `stream` is true"),
    summary="OpenAI-compatible text completion of a plain prompt (no chat template)",
)
async def completions(body: CompletionRequest, state: WebState = Depends(get_state)) -> Any:
    prompt = _prompt_text(body, state)
    settings = _settings(body, state, DEFAULT_COMPLETION_TOKENS)
    treatment = _treatment(body, state)
    service = state.service
    state.limits.check_token_budget(
        service.lm.tokenizer, [[{"content": prompt}]], new_tokens=settings.max_new_tokens, param="prompt"
    )
    completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    prepared = await service.prepare_text(prompt, settings.max_new_tokens)
    items = await service.open_stream(prepared, treatment, settings)

    def info(answer: Answer) -> dict[str, Any]:
        return {
            "projection": answer.running_projection,
            "layer": service.layer,
            "cap": treatment.cap,
            "alpha": treatment.alpha,
            "capped_tokens": answer.capped_tokens,
            "guard_switches": [_guard(s) for s in answer.switches],
        }

    def payload(text: str, finish: str | None, **extra: Any) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": state.model_id,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            **extra,
        }

    if not body.stream:
        async for item in items:
            if isinstance(item, Answer):
                return payload(
                    item.text, "stop" if item.stopped else "length", usage=_usage(item), personaxis=info(item)
                )
            if isinstance(item, StreamError):
                raise ApiError(item.status, item.message)
        raise ApiError(500, "generation ended without an answer")  # pragma: no cover

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        async for item in items:
            if isinstance(item, TokenStep):
                if item.delta:
                    yield f"data: {json.dumps(payload(item.delta, None, personaxis={'running_projection': item.projection}))}\n\n"
            elif isinstance(item, GuardSwitch):
                yield f"data: {json.dumps(payload('', None, personaxis={'guard': _guard(item)}))}\n\n"
            elif isinstance(item, Answer):
                extra: dict[str, Any] = {"personaxis": info(item)}
                if include_usage:
                    extra["usage"] = _usage(item)
                yield f"data: {json.dumps(payload('', 'stop' if item.stopped else 'length', **extra))}\n\n"
            elif isinstance(item, StreamError):
                yield _stream_error(item)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
