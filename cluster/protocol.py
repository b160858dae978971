"""Wire types between the ingress and the replicas: plain dicts of ints/strs/floats (no tensors,
nothing that needs the workers package to unpickle).

Owns: `GenerateRequest` (tokenized prompt + sampling parameters) and `Delta` (one streamed chunk).
"""

from __future__ import annotations

from typing import TypedDict


class GenerateRequest(TypedDict):
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # workers.SamplingParams fields


class Delta(TypedDict, total=False):
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    replica: str
    metrics: dict | None
    error: str | None
