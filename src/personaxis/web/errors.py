"""Errors of the web app: every failure is a JSON body ``{"error": {"message", "type", "code", "param"}}``.

The shape is OpenAI's, so the ``openai`` client shows the message as is; the pages show ``error.message``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_busy",
    504: "timeout",
}


class ApiError(Exception):
    """A request the app refuses, with the HTTP status and a message meant for the user."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, *, param: str | None = None, type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "error"), "code": status, "param": param}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, type=type), status_code=status, headers=headers)


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) if parts else "body"


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for the first few validation problems, and the first offending field."""
    problems = []
    first: str | None = None
    for err in exc.errors()[:5]:
        where = _location(err.get("loc", ()))
        message = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            loc = err.get("loc", ())
            at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            where, message = "body", f"malformed JSON{at}: {err.get('ctx', {}).get('error', message)}"
        first = first or where
        problems.append(f"{where}: {message}")
    more = len(exc.errors()) - len(problems)
    text = "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
    return text or "invalid request", first


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, type=exc.type, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc)
        return error_response(422, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's body parsing hit Python's recursion limit
            return error_response(
                422, "body: the JSON is nested too deeply to read (thousands of levels)", param="body"
            )
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, detail)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return error_response(422, "body: a value is nested too deeply to read (thousands of levels)", param="body")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - defensive
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
