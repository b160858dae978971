"""The ingress's mapping of OpenAI `response_format` and vLLM's `structured_outputs` to the engine's
constraint, without Ray (the e2e test runs the same through HTTP): every form maps, every bad one
is a 400 naming the field, and the constraint crosses to the replica as a plain dict."""

from __future__ import annotations

import pytest

from cluster.openai.errors import APIError
from cluster.openai.request_models import ChatRequest, CompletionRequest
from cluster.openai.sampling import to_sampling_params
from workers.sampling_params import SamplingParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _params(body: dict, kind=ChatRequest) -> SamplingParams:
    base = {"model": "m", **({"messages": [{"role": "user", "content": "hi"}]} if kind is ChatRequest else {"prompt": "hi"})}
    req = kind.model_validate({**base, **body})
    return to_sampling_params(req, prompt_len=3, max_tokens=8, max_model_len=64, vocab_size=100, logprobs=None)


@pytest.mark.parametrize("body,kind,want", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     ChatRequest, {"json": SCHEMA, "strict": True}),
    ({"response_format": {"type": "json_object"}}, CompletionRequest, {"json_object": True}),
    ({"response_format": {"type": "text"}}, ChatRequest, None),
    ({"structured_outputs": {"regex": "[a-z]+"}}, CompletionRequest, {"regex": "[a-z]+"}),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, ChatRequest, {"choice": ["yes", "no"]}),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, ChatRequest, {"grammar": 'root ::= "a"'}),
    ({"structured_outputs": {"json": '{"type": "integer"}'}}, ChatRequest, {"json": {"type": "integer"}}),
])
def test_forms_map_to_the_engine_constraint(body, kind, want):
    p = _params(body, kind)
    if want is None:
        assert p.structured_outputs is None
        return
    got = p.structured_outputs.to_dict()
    assert {k: got[k] for k in want} == want
    again = SamplingParams(**p.to_dict())  # what the replica rebuilds from the plain dict
    assert again.structured_outputs == p.structured_outputs


@pytest.mark.parametrize("body,field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "color"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": "{nope"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": {"type": "array", "contains": {}}}}, "structured_outputs.json"),
])
def test_bad_forms_are_400_naming_the_field(body, field):
    with pytest.raises(APIError) as e:
        _params(body)
    assert e.value.status == 400 and e.value.param == field and e.value.message.startswith(field), e.value.message
