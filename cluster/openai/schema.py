"""The OpenAPI document served at `/openapi.json` (interactive docs stay off).

Owns: `install_openapi(app)` and the error-body model. The endpoints read their bodies themselves
(cluster.openai.body: size, depth and Unicode checks before pydantic), so FastAPI sees no body
parameter and would document none; this fills in each operation's request body from the request
models' own JSON schema (the very models that validate it, `additionalProperties: false` from
`extra="forbid"`), and the status codes and OpenAI error body every endpoint can answer. Schema
fuzzers (schemathesis, tests/cluster/test_fuzz.py) generate requests from it.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from cluster.openai.request_models import ChatRequest, CompletionRequest

REF = "#/components/schemas/{model}"


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer: `{"error": {"message", "type", "param", "code"}}` (OpenAI's format)."""
    error: ErrorObject


_ERRORS = {
    "400": "invalid request: the message names the field",
    "401": "missing or wrong API key (when the server has one)",
    "404": "unknown model",
    "413": "request body too large",
    "429": "too many queued requests",
    "503": "overloaded or a replica was lost: retry after Retry-After seconds",
}
_GENERATE = {
    ("post", "/v1/chat/completions"): (ChatRequest, "chat.completion, or chat.completion.chunk events when stream"),
    ("post", "/v1/completions"): (CompletionRequest, "text_completion, or text_completion events when stream"),
}


def _error_responses(codes) -> dict:
    err = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
    return {c: {"description": _ERRORS[c], "content": err} for c in codes}


def build_openapi(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in (ChatRequest, CompletionRequest, ErrorResponse)],
                                 ref_template=REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    paths = doc.get("paths", {})
    for (method, path), (model, what) in _GENERATE.items():
        op = paths.get(path, {}).get(method)
        if op is None:
            continue
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}
        op["responses"] = {
            "200": {"description": what, "content": {
                "application/json": {"schema": {"type": "object", "required": ["id", "object", "choices"]}},
                "text/event-stream": {"schema": {"type": "string"}}}},
            **_error_responses(_ERRORS),
        }
    models_op = paths.get("/v1/models", {}).get("get")
    if models_op is not None:
        models_op["responses"] = {
            "200": {"description": "the served model", "content": {"application/json": {"schema": {
                "type": "object", "required": ["object", "data"]}}}},
            **_error_responses(["401"]),
        }
    return doc


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi
