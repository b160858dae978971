"""The sampling API over real HTTP on the package's shared app (SmolLM2 R-ISD, 2 replicas), with the
official `openai` client: chat / completions logprobs (streamed and not, lm-eval's float-equality
`is_greedy` check), `echo` prompt scoring, `n`, `logit_bias`, `min_tokens`, and 400s naming the
field for bad values while the replicas keep serving."""

from __future__ import annotations

import json

import pytest
import requests

from tests.cluster.support import MODEL
from workers.loader import load_tokenizer, resolve_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model(MODEL))


def _chat(client, content="Name three colors.", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def _check_chat_entries(content, k: int, greedy: bool) -> None:
    for e in content:
        assert len(e.top_logprobs) == k
        vals = [t.logprob for t in e.top_logprobs]
        assert vals == sorted(vals, reverse=True)
        same = [t for t in e.top_logprobs if t.token == e.token]
        if same:
            assert e.logprob in [t.logprob for t in same]  # its own entry, from the same tensor
        if greedy:
            assert e.logprob == e.top_logprobs[0].logprob  # exact float equality
        assert e.bytes is not None and bytes(e.bytes).decode("utf-8", errors="replace") == e.token


def test_chat_logprobs_streamed_and_not(client):
    r = _chat(client, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    _check_chat_entries(content, 5, greedy=True)
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content)
    streamed = []
    for ch in _chat(client, logprobs=True, top_logprobs=5, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content))
    sampled = _chat(client, logprobs=True, top_logprobs=3, temperature=1.0, seed=7, max_tokens=16)
    _check_chat_entries(sampled.choices[0].logprobs.content, 3, greedy=False)
    none = _chat(client, logprobs=True)  # top_logprobs unset: the chosen tokens only
    assert all(e.top_logprobs == [] for e in none.choices[0].logprobs.content)


def test_completions_logprobs_are_lm_eval_greedy(client):
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    for tok_s, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and top[tok_s] == v
        assert max(top.values()) == v  # lm-eval: is_greedy by exact float equality
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    streamed = [x.choices[0] for x in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True) if x.choices]
    toks = [t for ch in streamed if ch.logprobs for t in ch.logprobs.tokens]
    assert toks == lp.tokens and "".join(ch.text for ch in streamed) == c.choices[0].text


def test_echo_scores_the_prompt_as_lm_eval_does(client, tok):
    """echo + max_tokens 0: the prompt alone with its logprobs (first null); scoring the prompt
    followed by the greedy continuation gives that continuation's logprobs back, every token
    greedy (lm-eval's loglikelihood / is_greedy on `local-completions`), also batched."""
    ids = tok.encode(PROMPT, add_special_tokens=False)
    e = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ch = e.choices[0]
    assert ch.text == PROMPT and e.usage.completion_tokens == 0 and e.usage.prompt_tokens == len(ids)
    assert len(ch.logprobs.tokens) == len(ids) and ch.logprobs.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in ch.logprobs.token_logprobs[1:])
    cont = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, logprobs=1,
                                     extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    gen = cont.choices[0].logprobs
    gen_ids = [int(t.removeprefix("token_id:")) for t in gen.tokens]
    scored = client.completions.create(model=MODEL, prompt=[ids + gen_ids, ids], max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)  # token-id prompts, batched: what lm-eval sends
    assert [c.index for c in scored.choices] == [0, 1]
    s = scored.choices[0].logprobs
    assert s.tokens[len(ids):] == [tok.decode([t]) for t in gen_ids]
    tail = s.token_logprobs[len(ids):]
    assert all(abs(a - b) < 1e-4 for a, b in zip(tail, gen.token_logprobs)), (tail, gen.token_logprobs)
    assert all(max(top.values()) == v for top, v in zip(s.top_logprobs[len(ids):], tail))  # greedy
    assert scored.choices[1].logprobs.tokens == ch.logprobs.tokens
    one = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(one.choices[0].logprobs.tokens) == len(ids) + 1 and one.usage.completion_tokens == 1
    assert one.choices[0].text.startswith(PROMPT)


def test_n_choices_indexed_and_usage_summed(client):
    r = _chat(client, "Tell me a story.", n=3, temperature=1.0, max_tokens=8, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert len({c.message.content for c in r.choices}) > 1  # independent seeds
    seen, usage = {}, None
    for ch in _chat(client, "Tell me a story.", n=3, temperature=1.0, max_tokens=8, seed=3, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        for c in ch.choices:
            seen.setdefault(c.index, []).append(c.finish_reason)
        usage = ch.usage or usage
    assert sorted(seen) == [0, 1, 2] and all(v[-1] == "length" for v in seen.values())
    assert usage.completion_tokens == 24
    c = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=3,
                                  temperature=1.0, seed=5)
    assert [x.index for x in c.choices] == [0, 1, 2, 3] and c.usage.completion_tokens <= 12


def test_logit_bias_and_min_tokens(client, tok):
    (blue,) = tok.encode(" blue", add_special_tokens=False)
    for T in (0.0, 1.0):
        c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=T, logprobs=0,
                                      logit_bias={str(blue): 100})
        assert c.choices[0].logprobs.tokens == [" blue"] * 5
    short = _chat(client, "What is 2 plus 2?", max_tokens=40)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    held = _chat(client, "What is 2 plus 2?", max_tokens=40, extra_body={"min_tokens": 20})
    assert held.usage.completion_tokens >= 20


BAD = [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 17}, "n"),
    ("chat", {"logit_bias": {"99999999": 5}}, "logit_bias"),
    ("chat", {"logit_bias": {"12": 500}}, "logit_bias"),
    ("chat", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("chat", {"min_p": 1.5}, "min_p"),
    ("chat", {"presence_penalty": 3}, "presence_penalty"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty"),
    ("chat", {"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ("chat", {"stop_token_ids": [10**8]}, "stop_token_ids"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("kind,extra,field", BAD, ids=[f"{b[0]}-{b[2]}-{json.dumps(b[1])}" for b in BAD])
def test_bad_values_get_400_naming_the_field(cluster, kind, extra, field):
    base = cluster[1]
    body = {"model": MODEL, **({"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "hi"})}
    r = requests.post(f"{base}/v1/{'chat/completions' if kind == 'chat' else 'completions'}", json={**body, **extra},
                      timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(field) and err["message"].startswith(field), err
    ok = requests.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200


def test_replicas_still_healthy(cluster):
    from ray import serve

    st = serve.status().applications["idlm"].deployments["EngineReplica"]
    assert st.status == "HEALTHY" and st.replica_states.get("RUNNING") == 2
