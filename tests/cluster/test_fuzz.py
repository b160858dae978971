"""Schema fuzzing: `schemathesis` (PyPI) generates requests from the app's own `/openapi.json`
(valid ones and schema-violating ones) against a real Serve app over real HTTP: no answer is a
5xx, every error is an OpenAI-format body, responses match their documented status codes and
content types, and afterwards the app still serves a valid request on the very same replica.

The fuzzed app is a tiny ISD model (tests/models.py, 128-token context) deployed on the package's
shared Ray cluster (conftest.py: no extra Ray start), so every generated request is short however
large its `max_tokens` or `n`; the ingress is the one that ships. Hypothesis runs derandomized
with a bounded example count: the default CI run is the same ~100 requests every time
(`IDLM_FUZZ_EXAMPLES` scales it for a longer local run).
"""

from __future__ import annotations

import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

NAME = "fuzz"
SCALE = float(os.environ.get("IDLM_FUZZ_EXAMPLES", "1"))
# (method, path) -> examples of valid and of schema-violating requests; 100 in all. The GETs take
# no parameters, so nothing about them can violate the schema.
EXAMPLES = {("POST", "/v1/chat/completions"): (25, 20), ("POST", "/v1/completions"): (25, 20),
            ("GET", "/v1/models"): (5, 0), ("GET", "/health"): (5, 0)}


@schemathesis.check
def openai_error_body(ctx, response, case):
    """Every non-2xx answer is `{"error": {"message", "type", "param", "code"}}` with a message."""
    if response.status_code < 400:
        return None
    err = response.json().get("error")
    assert isinstance(err, dict) and {"message", "type", "param", "code"} <= err.keys(), response.text
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), response.text
    return None


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, openai_error_body]


_DEPLOYED: dict[int, str] = {}


@pytest.fixture
def fuzz_app(cluster, tiny_sdar_dir):
    """Base URL of the tiny app (deployed once per shared cluster; the prefix router, one replica)."""
    rs, _ = cluster
    if id(rs) not in _DEPLOYED:
        args = {"model": tiny_sdar_dir, "served_model_name": NAME, "mode": "isd", "stride": 4, "max_model_len": 128,
                "kv_cache_tokens": 64 * 16, "max_num_seqs": 16,
                "replica": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}}
        _DEPLOYED[id(rs)] = rs.deploy(args, NAME, f"/{NAME}")
    return _DEPLOYED[id(rs)]


def _replica_id() -> str:
    from ray import serve

    return serve.get_deployment_handle("EngineReplica", app_name=NAME).stats.remote().result()["replica"]


def _fuzz(schema, base: str, method: str, path: str, mode: GenerationMode, n: int) -> int:
    op = schema[path][method].ok() if hasattr(schema[path][method], "ok") else schema[path][method]
    calls = []
    session = requests.Session()

    @settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=["generate"])
    @given(case=op.as_strategy(mode), served=st.integers(0, 9))
    def run(case, served):
        # Mostly name the served model, so requests get past the 404 and reach the engine.
        if served and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = NAME
        # Sent with plain `requests` and validated by schemathesis: its own transport counts pooled
        # connections through urllib3 internals that urllib3-future (here via grafana-client) lacks.
        kw = case.as_transport_kwargs(base_url=base)
        if os.environ.get("IDLM_FUZZ_LOG"):
            with open(os.environ["IDLM_FUZZ_LOG"], "a") as f:
                f.write(repr(kw)[:2000] + "\n")
        r = session.request(**kw, timeout=30)
        case.validate_response(r, checks=CHECKS)
        calls.append(r.status_code)

    run()
    return len(calls)


@pytest.mark.parametrize("body", [{"prompt": ["abc", "def", "ghi"]}, {"prompt": "abc", "n": 3},
                                  {"prompt": [[5, 6, 7], [8, 9]], "n": 2, "stream": True}], ids=["prompts", "n", "both"])
def test_fan_out_on_one_replica(fuzz_app, body):
    """Regression (found by the fuzzer): the choices of one HTTP request are one handle call each,
    sharing the request's Serve id; on one replica the prefix router handed only the first a
    replica and the request hung."""
    r = requests.post(f"{fuzz_app}/v1/completions", json={"model": NAME, "max_tokens": 5, "ignore_eos": True, **body},
                      timeout=60)
    assert r.status_code == 200, r.text
    if body.get("stream"):
        done = [ln for ln in r.text.splitlines() if '"finish_reason": "length"' in ln]
        assert len(done) == 4 and r.text.rstrip().endswith("data: [DONE]")
    else:
        choices = r.json()["choices"]
        assert len(choices) == 3 and all(c["finish_reason"] == "length" for c in choices)


def test_schema_fuzz_no_5xx(fuzz_app):
    base = fuzz_app
    doc = requests.get(f"{base}/openapi.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert "requestBody" in doc["paths"][path]["post"], path
    assert requests.get(f"{base}/docs", timeout=30).status_code == 404  # the docs UI stays off
    before = _replica_id()
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    sent = 0
    for (method, path), counts in EXAMPLES.items():
        for mode, n in zip((GenerationMode.POSITIVE, GenerationMode.NEGATIVE), counts):
            if n:
                sent += _fuzz(schema, base, method, path, mode, n)
    assert sent >= 90 * min(SCALE, 1)
    ok = requests.post(f"{base}/v1/completions", json={"model": NAME, "prompt": "The capital", "max_tokens": 4,
                                                        "temperature": 0, "ignore_eos": True}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4, ok.text
    assert _replica_id() == before, "the fuzzed replica must never have been restarted"
