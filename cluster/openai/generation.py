"""Fan-out of one HTTP request into one replica stream per sample, and their collection.

Owns: `Job` (one sample to generate: choice index, prompt, parameters), `Sample` (what one choice
accumulated), `start` (submit every job, wait for each first delta so a bad request is still a 400
before the HTTP status is sent), `merge` (one stream of `(choice index, delta)` from all jobs) and
`Usage` (prompt tokens counted once per prompt, completion tokens summed over choices).

`n > 1` is `n` independent sibling requests (seed `seed + i` when a seed is given, else an engine
seed), which the router may place anywhere; once replicas share a prefix cache the siblings share
the prompt's KV through it with no change here.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cluster.openai.errors import APIError, replica_error
from cluster.prefix_routing import PromptHasher, generate_request
from cluster.protocol import Delta, GenerateRequest
from workers.sampling_params import SamplingParams


@dataclass
class Job:
    index: int
    """The choice index in the response."""
    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Sample:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    metrics: dict | None = None

    def add(self, d: Delta) -> None:
        self.text += d.get("text", "")
        self.token_ids += d.get("token_ids", [])
        self.logprobs += d.get("logprobs") or []
        if d.get("prompt_logprobs") is not None:
            self.prompt_logprobs = d["prompt_logprobs"]
        self.num_output_tokens = d.get("num_output_tokens", self.num_output_tokens)
        if d.get("finished"):
            self.finish_reason = "length" if d.get("finish_reason") == "length" else "stop"
            self.metrics = d.get("metrics")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: dict[int, int] = field(default_factory=dict)
    """Per prompt index: its tokens served from a replica's prefix cache (the first sample's count,
    as the prompt is counted once)."""

    @classmethod
    def of_jobs(cls, jobs: list[Job]) -> Usage:
        prompts = {j.prompt_index: len(j.prompt_token_ids) for j in jobs}
        return cls(prompt_tokens=sum(prompts.values()))

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}


def fan_out(prompts: list[list[int]], params: list[SamplingParams]) -> list[Job]:
    """Choices in OpenAI's order: prompt-major, then the prompt's n samples."""
    jobs = []
    for pi, (ids, p) in enumerate(zip(prompts, params)):
        for child in p.fan_out():
            jobs.append(Job(len(jobs), pi, ids, child))
    return jobs


@dataclass
class Started:
    jobs: list[Job]
    firsts: list[Delta]
    gens: list
    usage: Usage = field(default_factory=Usage)

    def cancel(self) -> None:
        _cancel(self.gens)


def _cancel(gens: list) -> None:
    """Client gone or done: the replicas stop and free the KV. A call that never reached a replica
    (rejected by backpressure) re-raises its error on cancel: nothing to stop there."""
    for g in gens:
        try:
            g.cancel()
        except Exception:  # noqa: BLE001
            pass


async def _first(gen) -> Delta:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "replica returned no output", type_="server_error") from None
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 (a ValueError from the engine, backpressure, a lost replica)
        raise replica_error(e) from None


def _submit(replica, req: GenerateRequest, own_id: bool):
    """One streaming call to the replicas. Ray Serve's router indexes its pending requests by the
    request context's internal id, which every handle call made while serving one HTTP request
    shares: siblings (n > 1, several prompts) would collapse into one pending entry and all but one
    would never be routed (Ray 2.60, `RequestRouter._add_pending_request_to_indices`). So each
    sibling is submitted from a copy of the context with an id of its own."""
    if not own_id:
        return replica.options(stream=True).generate.remote(req)

    def call():
        from ray.serve import context as serve_context

        cur = serve_context._get_serve_request_context()
        serve_context._serve_request_context.set(dataclasses.replace(cur, _internal_request_id=uuid.uuid4().hex))
        return replica.options(stream=True).generate.remote(req)

    return contextvars.copy_context().run(call)


async def start(replica, rid: str, jobs: list[Job], hasher: PromptHasher, cache_salt: str | None = None) -> Started:
    """`hasher` adds the prompt's block digests for the prefix router (cluster.prefix_routing)."""
    gens = []
    for j in jobs:
        sub = rid if len(jobs) == 1 else f"{rid}-{j.index}-{uuid.uuid4().hex[:6]}"
        req = generate_request(sub, j.prompt_token_ids, j.params, hasher, cache_salt)
        gens.append(_submit(replica, req, own_id=len(jobs) > 1))
    firsts = await asyncio.gather(*(_first(g) for g in gens), return_exceptions=True)
    bad = next((f for f in firsts if isinstance(f, BaseException)), None)
    if bad is not None:
        _cancel(gens)
        raise bad if isinstance(bad, APIError) else replica_error(bad)
    return Started(jobs, list(firsts), gens, Usage.of_jobs(jobs))


async def merge(st: Started) -> AsyncIterator[tuple[int, Delta]]:
    """Every job's deltas as they come, tagged with the job's choice index; ends when all are done.
    A failed stream raises its mapped `APIError`; the others are cancelled on the way out."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job, d: Delta, gen) -> None:
        try:
            while True:
                await q.put((job.index, d, None))
                if d.get("finished"):
                    return
                d = await gen.__anext__()
        except Exception as e:  # noqa: BLE001 (reported in-band to the consumer)
            await q.put((job.index, None, e))

    tasks = [asyncio.create_task(pump(j, f, g)) for j, f, g in zip(st.jobs, st.firsts, st.gens)]
    try:
        left = len(tasks)
        while left:
            index, d, err = await q.get()
            if err is not None:
                raise err if isinstance(err, APIError) else replica_error(err)
            if d.get("finished"):
                st.usage.cached_tokens.setdefault(st.jobs[index].prompt_index, d.get("num_cached_tokens", 0))
            yield index, d
            left -= bool(d.get("finished"))
    finally:
        for t in tasks:
            t.cancel()
        st.cancel()


async def collect(st: Started) -> list[Sample]:
    samples = [Sample(j.index) for j in st.jobs]
    async for index, d in merge(st):
        samples[index].add(d)
    return samples


def metrics_summary(samples: list[Sample]) -> dict | None:
    """The `idlm` extension of a response: ISD figures summed over its choices."""
    ms = [s.metrics for s in samples if s.metrics]
    if not ms:
        return None
    fwd = sum(m.get("num_forwards", 0) for m in ms)
    drafts = sum(m.get("num_draft_tokens", 0) for m in ms)
    out = sum(m.get("num_output_tokens", 0) for m in ms)
    return {"num_forwards": fwd, "tokens_per_forward": out / fwd if fwd else 0.0,
            "acceptance_rate": sum(m.get("num_accepted_tokens", 0) for m in ms) / drafts if drafts else 0.0}
