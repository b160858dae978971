"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Owns: `APIError` (raised anywhere in the ingress), `error_response`, `install_handlers(app)` (pydantic
validation errors -> 400 naming the field, unknown routes -> 404) and `replica_error` (a replica's
ValueError -> 400 naming its field, backpressure -> 503 + Retry-After, a lost replica -> 503).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

RETRY_AFTER_S = "1"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type_, headers


def _printable(s):
    """An error text that always encodes as UTF-8: a message quoting user input must not turn a
    400 into a 500 when that input holds a lone surrogate."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(s, str) else s


def error_response(status: int, message: str, param=None, code=None, type_="invalid_request_error", headers=None) -> JSONResponse:
    body = {"error": {"message": _printable(message), "type": type_, "param": _printable(param), "code": code or status}}
    return JSONResponse(body, status_code=status, headers=headers)


def field_error(message: str, status: int = 400) -> APIError:
    """A 400 for a `ValueError` whose message starts with the field name (`field: why`)."""
    return APIError(status, message, message.split(":")[0] if ":" in message else None)


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error as a 400 naming its field."""
    err = errors[0] if errors else {}
    param = ".".join(str(x) for x in err.get("loc", []) if x != "body") or None
    if err.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON")
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"unsupported parameter: {param}", param)
    msg = err.get("msg", "invalid request")
    return APIError(400, f"{param}: {msg}" if param else msg, param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), type_="invalid_request_error" if e.status_code < 500 else "server_error")


def replica_error(e: Exception) -> APIError:
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, ValueError):
        return field_error(str(cause))
    if isinstance(e, BackPressureError):
        return APIError(503, "server overloaded", code="overloaded", type_="server_error", headers={"Retry-After": RETRY_AFTER_S})
    return APIError(503, f"replica unavailable: {type(e).__name__}", code="replica_unavailable", type_="server_error",
                    headers={"Retry-After": RETRY_AFTER_S})
