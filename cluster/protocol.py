"""Wire types between the ingress and the replicas: plain dicts of ints/strs/floats (no tensors,
nothing that needs the workers package to unpickle).

Owns: `GenerateRequest` (tokenized prompt + sampling parameters) and `Delta` (one streamed chunk).
A logprob entry is `[logprob, top_ids, top_logprobs]` (top ones most likely first); the prompt's
list starts with None (its first token has no context).
"""

from __future__ import annotations

from typing import TypedDict


class _GenerateRequired(TypedDict):
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # workers.SamplingParams fields


class GenerateRequest(_GenerateRequired, total=False):
    prefix_hashes: list[bytes]
    """The prompt's full-block digests (workers.block_hash.prefix_hashes) for the prefix router."""
    cache_salt: str | None
    """Requests share cached prefix blocks only within one salt (tenant isolation)."""


class Delta(TypedDict, total=False):
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    replica: str
    metrics: dict | None
    error: str | None
    logprobs: list | None
    """One entry per token of `token_ids` (requests with `logprobs`)."""
    prompt_logprobs: list | None
    """On the first delta of a request with `prompt_logprobs`: one entry per prompt token."""
