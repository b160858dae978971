"""The soak's load (bench/soak.py runs it): the request mix, the HTTP client and the class each
request ends in.

Owns: `workload` (deterministic from a seed: chat and completions, streamed and not, greedy and
T=0.8 seeded, stop strings, short and long prompts, mixed `max_tokens`, a fraction of clients that
close their stream after a few chunks; greedy requests are drawn from a pool of references that
are also run alone), `send` and `Outcome`. Every request ends in exactly one class: `ok` (usage,
finish_reason and stop strings checked), `cancelled` (its client went away), `503` (a clean
OpenAI error, as status or in-band SSE event), `4xx`, or `lost` (timeout, another status, a body
that is not the OpenAI format, a stream without `[DONE]`: partial text passed off as success).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import httpx

WORDS = ("the river the mountain a small town an old library the quiet sea a busy market a long winter a bright "
         "morning the last train a tall tower").split()
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Explain gravity in one sentence.",
             "Write a short poem about the sea.", "How do I reverse a list in Python?", "Why is the sky blue?",
             "Tell me a story about a dragon.", "What is 2 plus 2?"]
STOPS = [".", "\n", " the", "e"]


@dataclass
class Spec:
    i: int
    endpoint: str  # chat | completions
    prompt: str
    max_tokens: int
    stream: bool
    temperature: float
    seed: int | None
    stop: list[str] | None
    disconnect_after: int | None = None
    """Close the stream after this many content chunks (a client going away)."""
    greedy_key: int | None = None
    """Index of the solo reference a greedy request must match."""
    ignore_eos: bool = False
    """Generate exactly `max_tokens` (finish_reason `length`): a stream of a known length."""

    def body(self, model: str) -> dict:
        b = {"model": model, "max_tokens": self.max_tokens, "temperature": self.temperature, "stream": self.stream}
        if self.endpoint == "chat":
            b["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            b["prompt"] = self.prompt
        if self.stream:
            b["stream_options"] = {"include_usage": True}
        if self.seed is not None:
            b["seed"] = self.seed
        if self.stop:
            b["stop"] = self.stop
        if self.ignore_eos:
            b["ignore_eos"] = True
        return b


@dataclass
class Outcome:
    i: int
    cls: str  # ok | cancelled | 503 | 4xx | lost
    why: str = ""
    status: int | None = None
    replica: str | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0


def make_prompt(rng: random.Random, long_words: int) -> str:
    q = rng.choice(QUESTIONS)
    if rng.random() < 0.4:  # a long context before the question
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(long_words // 10, long_words))) + ". " + q
    return q


def workload(n: int, seed: int, disconnect: float, lengths: list[int], long_words: int = 400,
             greedy_pool: int = 16) -> tuple[list[Spec], list[Spec]]:
    """(the solo references of the greedy pool, the n requests in order)."""
    rng = random.Random(seed)

    refs = [Spec(-1 - k, rng.choice(["chat", "completions"]), make_prompt(rng, long_words), rng.choice(lengths), False, 0.0, None,
                 [rng.choice(STOPS)] if rng.random() < 0.3 else None, greedy_key=k) for k in range(greedy_pool)]
    specs = []
    for i in range(n):
        gone = rng.random() < disconnect
        stream = gone or rng.random() < 0.5
        if rng.random() < 0.5:
            r = refs[rng.randrange(greedy_pool)]
            s = Spec(i, r.endpoint, r.prompt, r.max_tokens, stream, 0.0, None, r.stop, greedy_key=r.greedy_key)
        else:
            s = Spec(i, rng.choice(["chat", "completions"]), make_prompt(rng, long_words), rng.choice(lengths), stream, 0.8,
                     rng.randrange(1 << 30), [rng.choice(STOPS)] if rng.random() < 0.2 else None)
        s.disconnect_after = rng.randint(1, 3) if gone else None
        specs.append(s)
    return refs, specs


def _check(spec: Spec, text: str, finish: str | None, usage: dict | None) -> str:
    """Why a 200 answer is wrong ('' when it is right)."""
    if finish not in ("stop", "length"):
        return f"finish_reason {finish!r}"
    if not usage:
        return "no usage"
    ct, pt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    if not pt or ct is None or usage.get("total_tokens") != pt + ct or ct > spec.max_tokens:
        return f"usage {usage}"
    if spec.ignore_eos and finish != "length":
        return f"finish_reason {finish!r} with ignore_eos"
    if finish == "length" and ct != spec.max_tokens:
        return f"finish length with {ct} of {spec.max_tokens} tokens"
    if spec.stop and any(s in text for s in spec.stop):
        return "stop string in the output"
    return ""


async def send(client: httpx.AsyncClient, base: str, model: str, spec: Spec) -> Outcome:
    url = f"{base}/v1/{'chat/completions' if spec.endpoint == 'chat' else 'completions'}"
    t0 = time.monotonic()
    out = Outcome(spec.i, "lost")
    try:
        if spec.stream:
            await _stream(client, url, spec, model, out)
        else:
            r = await client.post(url, json=spec.body(model))
            out.status, out.replica = r.status_code, r.headers.get("x-idlm-replica")
            _classify_json(r, spec, out)
    except httpx.HTTPError as e:
        out.cls, out.why = "lost", f"{type(e).__name__}: {e}"[:200]
    out.seconds = time.monotonic() - t0
    return out


def _classify_json(r: httpx.Response, spec: Spec, out: Outcome) -> None:
    try:
        body = r.json()
    except ValueError:
        out.cls, out.why = "lost", f"HTTP {r.status_code}, body not JSON"
        return
    if r.status_code != 200:
        err = body.get("error") if isinstance(body, dict) else None
        ok_err = isinstance(err, dict) and err.get("message") and err.get("type")
        out.cls = "503" if r.status_code == 503 and ok_err else "4xx" if 400 <= r.status_code < 500 and ok_err else "lost"
        out.why = str(err)[:200]
        return
    c = body["choices"][0]
    out.text = c["message"]["content"] if spec.endpoint == "chat" else c["text"]
    out.finish_reason, out.completion_tokens = c["finish_reason"], body["usage"]["completion_tokens"]
    out.why = _check(spec, out.text, out.finish_reason, body.get("usage"))
    out.cls = "lost" if out.why else "ok"


async def _stream(client: httpx.AsyncClient, url: str, spec: Spec, model: str, out: Outcome) -> None:
    parts, finish, usage, done, chunks = [], None, None, False, 0
    async with client.stream("POST", url, json=spec.body(model)) as r:
        out.status, out.replica = r.status_code, r.headers.get("x-idlm-replica")
        if r.status_code != 200:
            await r.aread()
            _classify_json(r, spec, out)
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            d = json.loads(line[6:])
            if "error" in d:  # in-band: the replica was lost after the 200 went out
                err = d["error"]
                out.cls = "503" if err.get("type") == "server_error" and err.get("message") else "lost"
                out.why, out.text = f"in-band {err}"[:200], "".join(parts)
                return
            usage = d.get("usage") or usage
            for c in d.get("choices", []):
                piece = c.get("delta", {}).get("content") if spec.endpoint == "chat" else c.get("text")
                if piece:
                    parts.append(piece)
                    chunks += 1
                finish = c.get("finish_reason") or finish
            if spec.disconnect_after is not None and chunks >= spec.disconnect_after and finish is None:
                out.cls, out.why = "cancelled", f"client closed after {chunks} chunks"
                return  # leaving the `async with` closes the connection mid-stream
    out.text, out.finish_reason = "".join(parts), finish
    out.completion_tokens = (usage or {}).get("completion_tokens")
    out.why = "no [DONE]" if not done else _check(spec, out.text, finish, usage)
    out.cls = "lost" if out.why else "ok"
