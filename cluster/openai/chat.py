"""`POST /v1/chat/completions`: prompt building, parameters, the response and its SSE chunks.

Owns: `prepare` (chat template -> token ids -> one `Job` per choice) and `ChatFormatter` (the
`chat.completion` object and the `chat.completion.chunk` stream: a role chunk per choice, content
chunks carrying their tokens' `logprobs.content`, a finish chunk per choice, then usage when
`stream_options.include_usage`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from cluster.openai.errors import APIError
from cluster.openai.generation import Job, Sample, Started, Usage, fan_out, merge, metrics_summary
from cluster.openai.logprobs import TokenStrings, chat_content
from cluster.openai.request_models import ChatRequest
from cluster.openai.sampling import to_sampling_params


def prompt_ids(tokenizer, body: ChatRequest) -> list[int]:
    msgs = [m.as_template_dict() for m in body.messages]
    try:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    except Exception as e:
        raise APIError(400, f"messages: cannot apply the chat template: {e}", "messages") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prepare(tokenizer, body: ChatRequest, max_model_len: int, vocab_size: int) -> list[Job]:
    ids = prompt_ids(tokenizer, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: requires logprobs to be true", "top_logprobs")
    mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = to_sampling_params(body, prompt_len=len(ids), max_tokens=mt, max_model_len=max_model_len,
                                vocab_size=vocab_size, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                prompt_field="messages")
    return fan_out([ids], [params])


class ChatFormatter:
    def __init__(self, rid: str, body: ChatRequest, strings: TokenStrings) -> None:
        self.rid, self.model, self.strings = rid, body.model, strings
        self.as_ids = body.return_tokens_as_token_ids
        self.with_logprobs = body.logprobs
        self.created = int(time.time())

    def _logprobs(self, token_ids: list[int], entries: list) -> dict | None:
        return {"content": chat_content(self.strings, token_ids, entries, self.as_ids)} if self.with_logprobs else None

    def response(self, samples: list[Sample], usage: Usage) -> dict:
        choices = []
        for s in samples:
            c = {"index": s.index, "finish_reason": s.finish_reason,
                 "message": {"role": "assistant", "content": s.text}}
            if self.with_logprobs:
                c["logprobs"] = self._logprobs(s.token_ids, s.logprobs)
            choices.append(c)
        usage.completion_tokens = sum(s.num_output_tokens for s in samples)
        out = {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": choices, "usage": usage.as_dict()}
        if (m := metrics_summary(samples)) is not None:
            out["idlm"] = m
        return out

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        d = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "choices": choices}
        if usage is not None:
            d["usage"] = usage
        return d

    async def stream(self, st: Started, usage: Usage, include_usage: bool) -> AsyncIterator[dict]:
        for j in st.jobs:
            yield self._chunk([{"index": j.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        outs = {j.index: 0 for j in st.jobs}
        async for index, d in merge(st):
            outs[index] = d.get("num_output_tokens", outs[index])
            ids, text = d.get("token_ids", []), d.get("text", "")
            if text or (self.with_logprobs and ids):
                c = {"index": index, "delta": {"content": text}, "finish_reason": None}
                if self.with_logprobs:
                    c["logprobs"] = self._logprobs(ids, d.get("logprobs") or [])
                yield self._chunk([c])
            if d.get("finished"):
                reason = "length" if d.get("finish_reason") == "length" else "stop"
                yield self._chunk([{"index": index, "delta": {}, "finish_reason": reason}])
        if include_usage:
            usage.completion_tokens = sum(outs.values())
            yield self._chunk([], usage.as_dict())
