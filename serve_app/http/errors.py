"""OpenAI-shaped errors: every refusal leaves as `{"error": {"message", "type", "param", "code"}}`.

`ApiError` is what the checks raise; `add_error_handlers` makes the FastAPI app answer it, its
own validation errors, unknown routes and unexpected exceptions in that one shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.flow.retry import StageUnavailableError

logger = logging.getLogger("ray.serve")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ErrorDetail(BaseModel):
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None  # the request parameter to fix
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


class ApiError(Exception):
    """A request we refuse, with the parameter to fix."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status_code: int = 400,
        code: str | None = None,
        error_type: str = INVALID_REQUEST,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.code = code
        self.error_type = error_type
        self.headers = dict(headers or {})  # e.g. Retry-After on a 429

    def response(self) -> JSONResponse:
        return error_response(self.status_code, self.message, self.param, self.code, self.error_type, self.headers)


def error_response(
    status_code: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    error_type: str = INVALID_REQUEST,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def validation_error_response(errors: Sequence[Mapping[str, Any]]) -> JSONResponse:
    """FastAPI/pydantic validation errors -> one 400 naming the first bad parameter."""
    first: Mapping[str, Any] = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    message: str = first.get("msg", "invalid")
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "parse error")
        return error_response(400, f"the request body is not valid JSON ({reason})", None, "invalid_json")
    if kind in ("model_attributes_type", "dict_type", "model_type") and param is None:
        return error_response(400, "the request body must be a JSON object", None, "invalid_body")
    if kind == "missing" and param is None:
        return error_response(400, "the request body is empty: send a JSON object", None, "invalid_body")
    if kind == "missing":
        return error_response(400, f"missing required parameter: {param!r}", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return error_response(400, f"unknown parameter: {param!r}", param, "unknown_parameter")
    if kind == "literal_error" and param == "response_format":
        return error_response(400, "response_format must be 'b64_json' (URLs are not served)", param, "invalid_value")
    if param:
        message = f"invalid value for {param!r}: {message}"
    return error_response(400, message, param, "invalid_value")


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _request_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error_response(exc.errors())


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
    # headers kept: a 405 names the allowed methods in Allow (RFC 9110; found by schema fuzzing)
    return error_response(exc.status_code, str(exc.detail), error_type=error_type, headers=exc.headers)


def stage_unavailable(exc: StageUnavailableError) -> ApiError:
    """A stage that stayed down past the request's retry budget: 503, come back later."""
    return ApiError(
        str(exc),
        status_code=503,
        code="stage_unavailable",
        error_type=SERVER_ERROR,
        headers={"Retry-After": str(exc.retry_after_s)},
    )


async def _stage_unavailable(_: Request, exc: StageUnavailableError) -> JSONResponse:
    return stage_unavailable(exc).response()


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The client gets the error's kind; the traceback goes to the ingress replica's log.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", error_type=SERVER_ERROR)


def add_error_handlers(app: FastAPI) -> None:
    """Make `app` answer every error in the OpenAI shape."""
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RequestValidationError)(_request_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(StageUnavailableError)(_stage_unavailable)
    app.exception_handler(Exception)(_unexpected_error)


# The error answers /docs lists beside each endpoint's success. Declaring 4XX also keeps
# FastAPI from listing a 422 this API never sends (validation errors are 400s).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Refused; `error.param` names the parameter to fix."},
    "5XX": {"model": ErrorResponse, "description": "The pipeline is not ready (503) or failed (500)."},
}
