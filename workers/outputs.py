"""Typed hand-off objects between the engine and its callers (offline API, cluster replicas).

Owns: `RequestOutput` (one delta of one request, plain ints/strs so it crosses process
boundaries as-is) and `RequestMetrics` (per-request ISD and latency figures at finish). Logprob
entries are `workers.logprobs.TokenLogprob` (a named tuple of floats and ints).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_forwards: int = 0
    """Forwards of this request that committed tokens (the last prefill chunk counts)."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_preemptions: int = 0

    num_output_tokens: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return 0.0 if self.num_forwards == 0 else self.num_output_tokens / self.num_forwards

    @property
    def acceptance_rate(self) -> float:
        return 0.0 if self.num_draft_tokens == 0 else self.num_accepted_tokens / self.num_draft_tokens

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_forward"] = self.tokens_per_forward
        d["acceptance_rate"] = self.acceptance_rate
        return d


@dataclass
class RequestOutput:
    """A delta: the tokens/text committed for one request since its previous output."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the request, if any."""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    """Cumulative count of output tokens so far."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (usage.prompt_tokens_details.cached_tokens)."""
    metrics: RequestMetrics | None = None
    """Set on the final delta."""
    logprobs: list | None = None
    """One `TokenLogprob` per token of `new_token_ids` when the request asked for logprobs."""
    prompt_logprobs: list | None = None
    """On the first delta of a request that asked for them: one entry per prompt token (None first)."""
    error: str | None = None
    """Why the request failed (finish_reason "error"): a grammar that did not compile in time, say."""


@dataclass
class CompletionResult:
    """Whole result of one request for the offline API."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    logprobs: list | None = None
    """One `TokenLogprob` per token of `token_ids` (requests with `logprobs`)."""
    prompt_logprobs: list | None = None
    """One entry per prompt token, None first (requests with `prompt_logprobs`)."""
    index: int = 0
    """Which of the prompt's `n` samples this is."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
