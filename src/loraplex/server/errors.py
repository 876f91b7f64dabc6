"""Map errors to HTTP statuses in OpenAI's error shape, with OpenAI's `type` and a `code` per cause. A client's
mistake is a 4xx (a malformed body a 400), never a 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.errors import (
    AdapterNotFoundError,
    EngineUnavailableError,
    LoraplexError,
    NonFiniteOutputError,
    StateWriteError,
)
from loraplex.server.protocol import CAP_ERRORS

log = logging.getLogger(__name__)


def error_type(status: int) -> str:
    """OpenAI's error `type` for a status: every client error is an invalid_request_error (a wrong key too, as
    OpenAI answers it), every server error a server_error; the `code` says which (docs/serving.md)."""
    return "server_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """An error the server raises itself: its status, OpenAI-style `code` and the request field at fault."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers
        self.type = type_ or error_type(status)  # OpenAI's 429s say which limit: "requests" or "tokens"


def bad_request(message: str, param: str, code: str = "invalid_value") -> APIError:
    """A 400 naming the request field at fault."""
    return APIError(400, message, code, param)


def error_body(status: int, message: str, code: str | None, param: str | None = None,
               type_: str | None = None) -> dict[str, object]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_ or error_type(status), "param": param, "code": code}}


def status_of(e: BaseException) -> tuple[int, str]:
    """The HTTP status and error code of an exception."""
    if isinstance(e, APIError):
        return e.status, e.code
    if isinstance(e, StateWriteError):  # the server's disk, not the client's request
        return (507, "insufficient_storage") if e.disk_full else (503, "state_write_failed")
    if isinstance(e, AdapterNotFoundError):
        return 404, e.code
    if isinstance(e, EngineUnavailableError):
        return 503, e.code
    if isinstance(e, NonFiniteOutputError):  # well-formed, but this adapter cannot compute an answer to it
        return 422, e.code
    if isinstance(e, LoraplexError):
        return 400, e.code
    return 500, "internal_error"


def public_message(e: BaseException) -> str:
    """What the client is told: the cause of an error we raise on purpose; of a bug, nothing internal (logged)."""
    if not isinstance(e, (APIError, LoraplexError)):
        log.exception("internal error", exc_info=e)
        return "internal server error"
    return getattr(e, "message", None) or str(e)


def to_response(e: BaseException) -> JSONResponse:
    status, code = status_of(e)
    message = public_message(e)
    headers = getattr(e, "headers", None)
    if isinstance(e, EngineUnavailableError):
        headers = {"Retry-After": "1"}
    return JSONResponse(error_body(status, message, code, getattr(e, "param", None), getattr(e, "type", None)), status,
                        headers=headers)


# pydantic's error types -> OpenAI's codes; any other is a value of the wrong type.
_VALIDATION_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter",
                     "json_invalid": "invalid_json", "string_too_long": "string_above_max_length",
                     "too_long": "array_above_max_length", "field_cap": "value_above_max_length"}


def invalid_body(errors: list[dict[str, Any]]) -> APIError:
    """A body FastAPI could not read as the route's model, as a 400 naming the field (OpenAI's status for any
    malformed request). A field over its size cap (server/protocol.py) is named first, whatever else is wrong,
    so a huge body is answered by its size, never by what a parse of it found."""
    first = next((x for x in errors if x.get("type") in CAP_ERRORS), None) or (errors[0] if errors else {})
    kind = str(first.get("type", ""))
    if kind == "unsupported_parameter":  # server/extras.py: a known field at a value this server does not implement
        return APIError(400, str(first.get("msg")), kind, first.get("ctx", {}).get("param"))
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    code = _VALIDATION_CODES.get(kind, "invalid_type")
    if kind in CAP_ERRORS:
        message = f"{where} is over its limit: {first.get('msg')}"
    elif kind == "extra_forbidden":
        message = f"unknown parameter {where!r}: this server has no such field (docs/serving.md lists them)"
    elif kind == "json_invalid":  # its loc is the offset of the error, not a field
        message = f"the request body is not valid JSON: {first.get('msg', 'invalid')} at character {where}"
        where = None
    else:
        message = f"malformed request body: {where or 'body'}: {first.get('msg', 'invalid')}"
    return APIError(400, message, code, where)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    @app.exception_handler(LoraplexError)
    async def _known(_: Request, e: Exception) -> JSONResponse:
        return to_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
        return to_response(invalid_body(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "request_too_large"}.get(e.status_code, "http_error")
        return JSONResponse(error_body(e.status_code, str(e.detail), code), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return to_response(e)
