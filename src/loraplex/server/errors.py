"""Map errors to HTTP statuses in OpenAI's error shape. A client's mistake is never a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.errors import (
    AdapterError,
    AdapterNotFoundError,
    EngineUnavailableError,
    InvalidRequestError,
    LoraplexError,
    NonFiniteOutputError,
    StateWriteError,
)
from loraplex.server.protocol import CAP_ERRORS

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the server raises itself, with its status."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def bad_request(message: str, param: str) -> APIError:
    """A 400 naming the request field at fault."""
    return APIError(400, message, "BadRequestError", param)


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def status_of(e: BaseException) -> tuple[int, str]:
    if isinstance(e, APIError):
        return e.status, e.type
    if isinstance(e, StateWriteError):  # the server's disk, not the client's request
        return (507, "InsufficientStorageError") if e.disk_full else (503, "ServiceUnavailableError")
    if isinstance(e, AdapterNotFoundError):
        return 404, "NotFoundError"
    if isinstance(e, EngineUnavailableError):
        return 503, "ServiceUnavailableError"
    if isinstance(e, NonFiniteOutputError):  # well-formed, but this adapter cannot compute an answer to it
        return 422, "UnprocessableEntityError"
    if isinstance(e, (AdapterError, InvalidRequestError)):
        return 400, "BadRequestError"
    if isinstance(e, LoraplexError):
        return 400, "BadRequestError"
    return 500, "InternalServerError"


def public_message(e: BaseException) -> str:
    """What the client is told: the cause of an error we raise on purpose; of a bug, nothing internal (logged)."""
    if not isinstance(e, (APIError, LoraplexError)):
        log.exception("internal error", exc_info=e)
        return "internal server error"
    return getattr(e, "message", None) or str(e)


def to_response(e: BaseException) -> JSONResponse:
    status, type_ = status_of(e)
    message = public_message(e)
    headers = getattr(e, "headers", None)
    if isinstance(e, EngineUnavailableError):
        headers = {"Retry-After": "1"}
    return JSONResponse(error_body(status, message, type_, getattr(e, "param", None)), status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    @app.exception_handler(LoraplexError)
    async def _known(_: Request, e: Exception) -> JSONResponse:
        return to_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        # A field over its size cap (server/protocol.py) is a 400 naming it and the limit, like any bad value,
        # whatever else is wrong with the body; any other validation error is the body's shape, a 422.
        over = next((x for x in errors if x.get("type") in CAP_ERRORS), None)
        first = over or (errors[0] if errors else {})
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if over is not None:
            return JSONResponse(error_body(400, f"{where} is over its limit: {over.get('msg')}", "BadRequestError",
                                           where or None), 400)
        message = f"malformed request body: {where or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(422, message, "UnprocessableEntityError", where or None), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {408: "RequestTimeoutError", 413: "RequestTooLargeError"}.get(e.status_code, "HTTPError")
        return JSONResponse(error_body(e.status_code, str(e.detail), kind), e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return to_response(e)
