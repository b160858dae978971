"""End to end: a real local Ray cluster serving SmolLM2 on 2 engine replicas behind the OpenAI
ingress, driven over real HTTP by the official `openai` client (no mocks of Ray, HTTP or model).
The app is the package's shared one (tests/cluster/conftest.py: `cluster`, `client`)."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import json
import time

import httpx
import pytest
import requests

from cluster.metric_names import exported_names
from tests.cluster.support import MODEL, SHARED_ARGS, metric_sum, parse_metrics, replica_stats, wait_for
from workers import LLM, SamplingParams

ARGS = SHARED_ARGS
Q = "What is the capital of France?"
SEEN_REPLICAS: set[str] = set()  # replica ids seen by the concurrency test; must survive the bad inputs


def _chat(client, content=Q, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_chat_and_completions_streamed_and_not(client):
    r = _chat(client)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts, usage = [], None
    for ch in _chat(client, stream=True, stream_options={"include_usage": True}):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == r.choices[0].message.content
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens <= 8
    streamed = "".join(x.choices[0].text for x in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if x.choices)
    assert streamed == c.choices[0].text
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_max_tokens_length_exactly_k(client, k):
    r = _chat(client, "Write a long story about a dragon.", max_tokens=k)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == k


def test_greedy_http_equals_offline_and_stop_strings(client):
    """Greedy HTTP output equals the offline engine's; a stop string placed inside the longest
    streamed chunk (one engine step's committed block, several tokens when drafts were accepted)
    cuts the output exactly there, streamed and not, and never leaks."""
    # small KV budget: the KV cache is preallocated and this machine's memory is shared
    offline = LLM(MODEL, mode=ARGS["mode"], stride=4, kv_cache_tokens=1024, max_num_seqs=4)
    prompts = ["Name three colors.", "Explain gravity in one sentence.", "What is 2 plus 2?"]
    refs = [offline.generate([offline.encode_chat([{"role": "user", "content": p}])],
                             SamplingParams(temperature=0, max_tokens=24))[0] for p in prompts]
    del offline
    gc.collect()
    for p, ref in zip(prompts, refs):
        r = _chat(client, p, max_tokens=24)
        assert r.choices[0].message.content == ref.text
        chunks = [c.choices[0].delta.content for c in _chat(client, p, max_tokens=24, stream=True)
                  if c.choices and c.choices[0].delta.content]
        assert "".join(chunks) == ref.text
        block = max(chunks, key=lambda c: len(c.strip()))
        core = block.strip()
        if len(core) < 2:
            continue
        stop = core[len(core) // 2:len(core) // 2 + 2]
        want = ref.text[: ref.text.index(stop)]
        r2 = _chat(client, p, max_tokens=24, stop=[stop])
        assert r2.choices[0].finish_reason == "stop"
        assert r2.choices[0].message.content == want
        streamed = [c for c in _chat(client, p, max_tokens=24, stop=[stop], stream=True) if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in streamed)
        assert text == want and stop not in text
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_requests_both_replicas(cluster):
    base = cluster[1]

    def one(i):
        r = requests.post(f"{base}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": f"Count to {i % 5 + 2}."}],
            "max_tokens": 8, "temperature": 0.7, "seed": i}, timeout=300)
        return r.status_code, r.headers.get("x-idlm-replica"), r.json()

    with cf.ThreadPoolExecutor(32) as ex:
        res = list(ex.map(one, range(32)))
    assert all(s == 200 for s, _, _ in res), [b for s, _, b in res if s != 200][:2]
    reps = {rep for _, rep, _ in res}
    assert len(reps) == 2, "both replicas should have served requests"
    SEEN_REPLICAS.update(reps)


BAD = [
    ("malformed json", "{not json", 400),
    ("missing messages", {"model": MODEL}, 400),
    ("wrong type", {"model": MODEL, "messages": "hi"}, 400),
    ("wrong type max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400),
    ("negative max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400),
    ("temperature > 2", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400),
    ("top_p > 1", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("unknown parameter", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "best_of": 3}, 400),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("prompt over context", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}, 400),
    ("max_tokens over context", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400),
    ("oversized body", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 1_200_000}]}, 413),
    # Each of these answered 500 before cluster.openai.body checked the raw JSON.
    ("deeply nested json", f'{{"model": "{MODEL}", "messages": {"[" * 100_000 + "]" * 100_000}}}', 400),
    ("nested past the depth limit", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "user": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}, 400),
    ("lone surrogate in content", {"model": MODEL, "messages": [{"role": "user", "content": "hi \ud800 there"}]}, 400),
    ("lone surrogate in a key", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "\udc00": 1}, 400),
    ("lone surrogate in stop", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["\udfff"]}, 400),
    ("lone surrogate in model", {"model": "\ud83d", "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("NaN is not JSON", '{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ("invalid utf-8", b'{"model": "\xff\xfe", "messages": []}', 400),
]


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_matrix(cluster, name, body, status):
    base = cluster[1]
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = requests.post(f"{base}/v1/chat/completions", data=data, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    # the server still answers a good request
    ok = requests.post(f"{base}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200


BAD_COMPLETIONS = [
    ("missing prompt", {"model": MODEL}, 400),
    ("empty prompt", {"model": MODEL, "prompt": ""}, 400),
    ("token id out of range", {"model": MODEL, "prompt": [1, 2, 10**9]}, 400),
    ("prompt over context", {"model": MODEL, "prompt": "word " * 3000}, 400),
    ("unknown parameter", {"model": MODEL, "prompt": "hi", "suffix": "x"}, 400),
    ("zero max_tokens", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
    ("unknown model", {"model": "nope", "prompt": "hi"}, 404),
    ("lone surrogate in prompt", {"model": MODEL, "prompt": "The \ud800 capital"}, 400),
    ("lone surrogate in prompt list", {"model": MODEL, "prompt": ["ok", "\udbff"]}, 400),
]


@pytest.mark.parametrize("name,body,status", BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_input_completions(cluster, name, body, status):
    r = requests.post(f"{cluster[1]}/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}


def test_health_and_unknown_route(cluster):
    base = cluster[1]
    assert requests.get(f"{base}/health", timeout=30).status_code == 200
    r = requests.get(f"{base}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_no_replica_restarted(cluster):
    import ray
    from ray import serve

    st = serve.status().applications["idlm"].deployments["EngineReplica"]
    assert st.status == "HEALTHY"
    assert st.replica_states.get("RUNNING") == 2
    assert len(SEEN_REPLICAS) == 2
    for rid in SEEN_REPLICAS:  # the very same replica actors are still alive (a restart gets a new id)
        ray.get_actor(f"SERVE_REPLICA::idlm#EngineReplica#{rid}", namespace="serve")


def test_stream_close_aborts_request(cluster):
    rs, base = cluster
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{base}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Write a very long essay about oceans."}],
            "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            n = 0
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    n += 1
                if n >= 3:
                    break  # client goes away mid-stream
    def idle():
        m = parse_metrics(rs.scrape())
        running = metric_sum(m, "ray_idlm_num_requests_running", MODEL)
        kv = metric_sum(m, "ray_idlm_kv_cache_usage_ratio", MODEL)
        aborted = metric_sum(m, "ray_idlm_requests_total", MODEL, finish_reason="abort")
        return running == 0 and kv == 0 and aborted >= 1
    assert wait_for(idle, timeout=90), "replica should abort the request and free its KV"


SYSTEM = ("You are the help desk of a public library. Answer in one short sentence. The library opens at nine "
          "and closes at six, has a children's corner on the first floor, rents laptops for two hours at a time, "
          "prints at ten cents a page and hosts a reading club every Thursday evening in room 4.")


def test_prefix_cache_reports_cached_tokens(client, cluster):
    """A shared system prompt: the repeat request is routed to the replica that has it and reports
    `usage.prompt_tokens_details.cached_tokens` (non-streamed and in the streamed usage chunk), with
    the same text; another `cache_salt` shares nothing. A small second app evicts."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When do you open?"}]
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    again = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert again.headers["x-idlm-replica"] == first.headers["x-idlm-replica"]
    r1, r2 = first.parse(), again.parse()
    assert r1.choices[0].message.content == r2.choices[0].message.content
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 16 == 0 and cached < r2.usage.prompt_tokens, r2.usage
    usage = None
    for ch in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                             stream_options={"include_usage": True}):
        usage = ch.usage or usage
    assert usage.prompt_tokens_details.cached_tokens >= cached
    salted = [client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                             extra_body={"cache_salt": "tenant-b"}) for _ in range(2)]
    assert salted[0].usage.prompt_tokens_details.cached_tokens == 0
    assert salted[1].usage.prompt_tokens_details.cached_tokens == cached
    assert salted[0].choices[0].message.content == r1.choices[0].message.content
    bad = requests.post(f"{cluster[1]}/v1/chat/completions", json={"model": MODEL, "messages": msgs, "cache_salt": ""},
                        timeout=60)
    assert bad.status_code == 400 and "cache_salt" in bad.json()["error"]["message"]


def test_small_cache_evicts(cluster, tiny_llama_dir):
    """A second app (tiny model, 32 KV blocks, kept until the module ends so its series stay on the
    metrics endpoint): distinct long prompts evict cached blocks; every request still completes."""
    from ray import serve

    rs, _ = cluster
    args = {"model": tiny_llama_dir, "served_model_name": "evict", "mode": "ar", "kv_cache_tokens": 32 * 16,
            "max_model_len": 512, "replica": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}}
    base = rs.deploy(args, "evict", "/evict")
    for i in range(4):
        prompt = [(7 * i + j) % 380 + 4 for j in range(200)]
        r = requests.post(f"{base}/v1/completions", json={"model": "evict", "prompt": prompt, "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text
    st = serve.get_deployment_handle("EngineReplica", app_name="evict").stats.remote().result()
    assert st["prefix_cache_evictions"] > 0 and st["requests"]["length"] == 4, st


def test_metrics_names_and_tpf(cluster, client):
    rs, base = cluster

    def counters():
        m = parse_metrics(rs.scrape())
        return (metric_sum(m, "ray_idlm_generation_tokens_total", MODEL),
                metric_sum(m, "ray_idlm_decode_forwards_total", MODEL))

    # Earlier tests' requests (the aborted stream above) can still land in the counters after their
    # gauges read idle: Ray's agent reports every few seconds. Start from counters that held still
    # across more than one report interval, or the deltas below would count someone else's tokens.
    seen = [counters()]

    def steady():
        time.sleep(11)  # > Ray's default metrics report interval (10 s)
        seen.append(counters())
        return seen[-1] if seen[-1] == seen[-2] else None

    start = wait_for(steady, timeout=90, interval=0)
    assert start, f"counters kept moving with no request in flight: {seen}"
    gen0, fwd0 = start
    toks = fwds = 0
    for q in ["Name a fruit.", "Say hello in French.", "What color is the sky?", "Give me a number."]:
        r = requests.post(f"{base}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 16, "temperature": 0}, timeout=120).json()
        toks += r["usage"]["completion_tokens"]
        fwds += r["idlm"]["num_forwards"]

    def settled():
        m = parse_metrics(rs.scrape())
        dg = metric_sum(m, "ray_idlm_generation_tokens_total", MODEL) - gen0
        df = metric_sum(m, "ray_idlm_decode_forwards_total", MODEL) - fwd0
        return m if (dg, df) == (toks, fwds) else None

    m = wait_for(settled, timeout=90)
    assert m, "counters should match the engine's own per-request stats"
    names = set(m)
    missing = [n for n in exported_names() if n not in names]
    assert not missing, missing
    for n in exported_names():
        labels = m[n][0][0]
        assert {"model", "mode", "stride", "replica"} <= labels.keys()

    # Per replica, the exported counters equal the engine's own cumulative stats, so TPF and
    # acceptance computed from the counters are the engine's.
    engine_stats = replica_stats("idlm")
    assert len(engine_stats) == 2

    def per_replica_equal():
        m = parse_metrics(rs.scrape())
        for rid, st in engine_stats.items():
            g = metric_sum(m, "ray_idlm_generation_tokens_total", MODEL, replica=rid)
            f = metric_sum(m, "ray_idlm_decode_forwards_total", MODEL, replica=rid)
            d = metric_sum(m, "ray_idlm_draft_tokens_total", MODEL, replica=rid)
            a = metric_sum(m, "ray_idlm_accepted_tokens_total", MODEL, replica=rid)
            if (g, f, d, a) != (st["generation_tokens"], st["decode_forwards"], st["draft_tokens"], st["accepted_tokens"]):
                return False
            assert abs(g / f - st["tokens_per_forward"]) < 1e-9
            if d:
                assert abs(a / d - st["acceptance_rate"]) < 1e-9
        return True
    assert wait_for(per_replica_equal, timeout=90), engine_stats


def test_backpressure_and_api_key(cluster):
    """A second app on the same cluster with tiny limits (1 ongoing + 1 queued) and an API key:
    a flood gets 503/429 with Retry-After, every accepted request completes; no key -> 401."""
    rs, _ = cluster
    tiny = {**ARGS, "mode": "ar", "served_model_name": "tiny", "api_key": "sekrit", "kv_cache_tokens": 2048,
            "replica": {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                        "ray_actor_options": {"num_cpus": 0.5}}}
    base = rs.deploy(tiny, "tiny", "/tiny")
    auth = {"authorization": "Bearer sekrit"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = requests.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    assert requests.get(f"{base}/v1/models", timeout=60).status_code == 401
    assert requests.get(f"{base}/v1/models", headers=auth, timeout=60).json()["data"][0]["id"] == "tiny"
    assert requests.get(f"{base}/health", timeout=60).status_code == 200  # probes need no key

    def one(i):
        r = requests.post(f"{base}/v1/chat/completions", json=body, headers=auth, timeout=300)
        return r.status_code, r.headers.get("retry-after"), r.json()

    with cf.ThreadPoolExecutor(12) as ex:
        res = list(ex.map(one, range(12)))
    rejected = [r for r in res if r[0] in (429, 503)]
    accepted = [r for r in res if r[0] == 200]
    assert len(rejected) + len(accepted) == len(res), [r[0] for r in res]
    assert rejected and accepted, [r[0] for r in res]
    assert all(ra is not None and int(ra) >= 1 for _, ra, _ in rejected)
    assert all(b["error"]["message"] and b["error"]["type"] for _, _, b in rejected)
    assert all(b["usage"]["completion_tokens"] == 24 and b["choices"][0]["finish_reason"] == "length" for _, _, b in accepted)
    serve_delete("tiny")


def serve_delete(name: str) -> None:
    from ray import serve

    serve.delete(name)
