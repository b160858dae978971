"""Structured outputs over real HTTP on the shared app (SmolLM2 R-ISD, 2 replicas) with the official
`openai` client: `response_format` json_schema (strict) streamed and not, json_object, vLLM's
`structured_outputs` extra (choice, regex), and 400s naming the field for invalid or unsupported
constraints while the replicas keep serving."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import requests

from tests.cluster.support import MODEL

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"], "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Describe a cat as JSON with its color and whether it is ok."}]


def test_openai_client_json_schema_streamed_and_not(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format=RF, max_tokens=32, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=RF, max_tokens=32, temperature=0, stream=True) if ch.choices)
    assert streamed == text
    sampled = client.chat.completions.create(model=MODEL, messages=ASK, response_format=RF, max_tokens=32,
                                             temperature=1.0, top_p=0.9, seed=3, n=2)
    for c in sampled.choices:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_and_structured_outputs_extra(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                       max_tokens=48, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    c = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=6, temperature=0.7, seed=1,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert c.choices[0].text in ("yes", "no") and c.choices[0].finish_reason == "stop"
    c = client.completions.create(model=MODEL, prompt="A date:", max_tokens=16, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "20[0-9]{2}-[01][0-9]"}})
    assert re.fullmatch("20[0-9]{2}-[01][0-9]", c.choices[0].text)


BAD = [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "structured_outputs.json"),  # parsed by the replica's grammar backend
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"oneOf": []}}}},
     "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("completions", {"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
    ("completions", {"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ("completions", {"guided_json": {"type": "object"}}, "guided_json"),
]


@pytest.mark.parametrize("kind,extra,field", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_invalid_constraints_get_400_and_replicas_keep_serving(cluster, kind, extra, field):
    base = cluster[1]
    body = {"model": MODEL, "max_tokens": 4, **({"messages": ASK} if kind == "chat" else {"prompt": "hi"})}
    r = requests.post(f"{base}/v1/{'chat/completions' if kind == 'chat' else 'completions'}", json={**body, **extra},
                      timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(field), err
    ok = requests.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200
