"""`POST /v1/completions`: prompts (text or token ids, one or several), `echo`, `logprobs`, the
response and its SSE chunks.

Owns: `prepare` (prompts -> one `Job` per choice) and `CompletionFormatter`. `echo` returns the
prompt before the completion; with `logprobs` it also returns the prompt's logprobs (the first is
null), computed from the prefill. `echo` with `max_tokens: 0` scores the prompt only, as lm-eval's
`local-completions` does: the engine runs the prefill (one token, dropped), the choice carries the
prompt alone and `completion_tokens` is 0.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster.openai.errors import APIError
from cluster.openai.generation import Job, Sample, Started, Usage, fan_out, merge, metrics_summary
from cluster.openai.logprobs import TokenStrings, completion_logprobs
from cluster.openai.request_models import CompletionRequest
from cluster.openai.sampling import to_sampling_params


@dataclass
class Prompt:
    token_ids: list[int]
    text: str


def prompts_of(tokenizer, body: CompletionRequest) -> list[Prompt]:
    p = body.prompt
    items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not items:
        raise APIError(400, "prompt: must not be empty", "prompt")
    V = len(tokenizer)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(Prompt(tokenizer.encode(item, add_special_tokens=False), item))
        else:
            if any(t < 0 or t >= V for t in item):
                raise APIError(400, f"prompt: token ids must be in [0, {V})", "prompt")
            out.append(Prompt(list(item), tokenizer.decode(item)))
        if not out[-1].token_ids:
            raise APIError(400, "prompt: must not be empty", "prompt")
    return out


def prepare(tokenizer, body: CompletionRequest, max_model_len: int, vocab_size: int) -> tuple[list[Prompt], list[Job], bool]:
    """(prompts, jobs, echo_only): echo_only when `echo` with `max_tokens: 0` (prompt scoring)."""
    prompts = prompts_of(tokenizer, body)
    echo_only = body.echo and body.max_tokens == 0
    if body.max_tokens is not None and body.max_tokens < 0 or (body.max_tokens == 0 and not body.echo):
        raise APIError(400, f"max_tokens: must be a positive integer (0 only with echo), got {body.max_tokens}", "max_tokens")
    want_prompt_lp = body.logprobs if body.echo else None
    params = [to_sampling_params(body, prompt_len=len(p.token_ids), max_tokens=1 if echo_only else body.max_tokens,
                                 max_model_len=max_model_len, vocab_size=vocab_size, logprobs=body.logprobs,
                                 prompt_logprobs=want_prompt_lp)
              for p in prompts]
    return prompts, fan_out([p.token_ids for p in prompts], params), echo_only


class CompletionFormatter:
    def __init__(self, rid: str, body: CompletionRequest, strings: TokenStrings, prompts: list[Prompt],
                 jobs: list[Job], echo_only: bool) -> None:
        self.rid, self.model, self.strings = rid, body.model, strings
        self.as_ids = body.return_tokens_as_token_ids
        self.echo, self.echo_only, self.with_logprobs = body.echo, echo_only, body.logprobs is not None
        self.prompt_of = {j.index: prompts[j.prompt_index] for j in jobs}
        self.created = int(time.time())

    def _echo_part(self, index: int, prompt_logprobs: list | None) -> tuple[str, list[int], list]:
        p = self.prompt_of[index]
        return p.text, p.token_ids, (prompt_logprobs or [None] * len(p.token_ids))

    def response(self, samples: list[Sample], usage: Usage) -> dict:
        choices = []
        for s in samples:
            text, ids, entries = "", [], []
            if self.echo:
                text, ids, entries = self._echo_part(s.index, s.prompt_logprobs)
                ids, entries = list(ids), list(entries)
            if not self.echo_only:
                text, ids, entries = text + s.text, ids + s.token_ids, entries + s.logprobs
            c = {"index": s.index, "text": text, "finish_reason": "length" if self.echo_only else s.finish_reason,
                 "logprobs": completion_logprobs(self.strings, ids, entries, as_ids=self.as_ids)[0] if self.with_logprobs else None}
            choices.append(c)
        usage.completion_tokens = 0 if self.echo_only else sum(s.num_output_tokens for s in samples)
        out = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": choices, "usage": usage.as_dict()}
        if (m := metrics_summary(samples)) is not None:
            out["idlm"] = m
        return out

    def _chunk(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    async def stream(self, st: Started, usage: Usage, include_usage: bool) -> AsyncIterator[dict]:
        offsets = {j.index: 0 for j in st.jobs}
        outs = dict.fromkeys(offsets, 0)
        started: set[int] = set()

        def piece(index: int, text: str, ids: list[int], entries: list, finish=None) -> dict:
            lp = None
            if self.with_logprobs:
                lp, offsets[index] = completion_logprobs(self.strings, ids, entries, offsets[index], self.as_ids)
            return self._chunk(index, text, lp, finish)

        async for index, d in merge(st):
            if index not in started:
                started.add(index)
                if self.echo:
                    yield piece(index, *self._echo_part(index, d.get("prompt_logprobs")))
            outs[index] = d.get("num_output_tokens", outs[index])
            ids, text = d.get("token_ids", []), d.get("text", "")
            if not self.echo_only and (text or (self.with_logprobs and ids)):
                yield piece(index, text, ids, d.get("logprobs") or [])
            if d.get("finished"):
                reason = "length" if self.echo_only or d.get("finish_reason") == "length" else "stop"
                yield self._chunk(index, "", None, reason)
        if include_usage:
            usage.completion_tokens = 0 if self.echo_only else sum(outs.values())
            yield {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [], "usage": usage.as_dict()}
