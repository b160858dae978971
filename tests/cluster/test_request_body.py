"""The raw-body checks (cluster.openai.body) and the OpenAPI document (cluster.openai.schema), on
their own (no Ray): each rejected body is an `APIError` with the status and the field it names;
the document carries each endpoint's request body, the very models that validate it."""

from __future__ import annotations

import json

import pytest

from cluster.openai.body import MAX_JSON_DEPTH, check_length_header, parse_json_object
from cluster.openai.errors import APIError, error_response

REJECTED = [
    ("depth past the recursion limit", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "body"),
    ("depth past the limit", json.dumps({"messages": [{"content": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]}).encode(), "messages"),
    ("lone high surrogate", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("lone low surrogate deep", b'{"messages": [{"content": [{"text": "\\udfff"}]}]}', "messages.0.content.0.text"),
    ("surrogate in a key", b'{"logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("NaN", b'{"temperature": NaN}', None),
    ("Infinity", b'{"temperature": -Infinity}', None),
    ("not utf-8", b'{"prompt": "\xff"}', None),
    ("not an object", b"[1, 2]", None),
]


@pytest.mark.parametrize("name,raw,param", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_bodies_are_400_naming_the_field(name, raw, param):
    with pytest.raises(APIError) as e:
        parse_json_object(raw)
    assert e.value.status == 400 and e.value.param == param and e.value.message
    # the error body itself always encodes (no surrogate can make it a 500)
    assert json.loads(error_response(400, e.value.message, e.value.param).body)["error"]["message"]


def test_accepted_bodies():
    ok = {"messages": [{"role": "user", "content": [{"type": "text", "text": "h\u00e9llo \U0001f600 \u4e16"}]}],
          "logit_bias": {"5": -1}}
    assert parse_json_object(json.dumps(ok).encode()) == ok
    assert parse_json_object(json.dumps(ok, ensure_ascii=False).encode()) == ok
    nested = {"x": json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))}
    assert parse_json_object(json.dumps(nested).encode()) == nested
    # a valid surrogate *pair* escape is an ordinary astral character
    assert parse_json_object(b'{"p": "\\ud83d\\ude00"}') == {"p": "\U0001f600"}


def test_content_length_header():
    check_length_header(None, 10)
    check_length_header("10", 10)
    for value, status in (("11", 413), ("ten", 400), ("", 400)):
        with pytest.raises(APIError) as e:
            check_length_header(value, 10)
        assert e.value.status == status


def test_error_response_survives_surrogates():
    body = json.loads(error_response(400, "unsupported parameter: \ud800", "\udc00").body)
    assert body["error"]["message"] == "unsupported parameter: \\ud800" and body["error"]["param"] == "\\udc00"


def test_openapi_documents_request_bodies():
    from cluster.ingress import app

    doc = app.openapi()
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatRequest"), ("/v1/completions", "CompletionRequest")):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert schemas[model]["additionalProperties"] is False  # extra="forbid": unknown fields are a 400
        assert {"200", "400", "404", "413", "503"} <= op["responses"].keys()
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "messages" in schemas["ChatRequest"]["required"] and "prompt" in schemas["CompletionRequest"]["required"]
    assert "top_k" in schemas["ChatRequest"]["properties"]  # vLLM's extras are documented too
    assert set(schemas["ErrorObject"]["required"]) == {"message", "type"}
    assert app.docs_url is None and app.redoc_url is None
