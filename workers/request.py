"""Per-request state: the single carrier of everything the scheduler and ISD decoder know about a
request (vLLM's `Request`, nano-vllm's `Sequence`). Only the scheduler and the decoder mutate it.

Token accounting: `all_token_ids = prompt + output`. The KV cache holds valid entries for
`all_token_ids[:num_computed]`; the last token (`pending`) never has KV when a round starts: it is
the first row of the next block. `drafts` (up to N-1) follow `pending`, each proposed from a MASK
row of the previous forward, with the logits it was drawn from (`draft_logits`, for q).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from workers.block_hash import chain_from
from workers.outputs import FinishReason, RequestMetrics
from workers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    rng_key: int
    """32-bit key of the request's random stream (idlm_kernels.rng.request_key(seed))."""
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)
    draft_logits: torch.Tensor | None = None  # [len(drafts), V] float32, None for greedy requests
    rng_step: int = 0
    stride: int = 0
    """Stride chosen for the request's next decode round (0: not chosen yet; see workers.stride)."""
    accept_state: list | None = None
    """Running acceptance counts per draft position (`AcceptanceEstimator.new_state()`)."""
    penalty_state: object | None = None
    """Output-token counts of a request with penalties (`workers.logits_processors.PenaltyState`)."""
    grammar: object | None = None
    """The request's matcher when it has `structured_outputs` (`workers.grammar.RequestGrammar`),
    once compiled; its state always equals `output_token_ids`."""
    grammar_pending: object | None = None
    """The compilation in flight (`workers.grammar.PendingGrammar`) until `grammar` is set."""
    prompt_logprobs: list | None = None
    """Prompt logprobs gathered so far when requested: entry p is that of prompt token p + 1."""
    prompt_logprobs_sent: bool = False
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # text state (owned by workers.detokenizer)
    text: str = ""
    text_sent: int = 0
    detok_state: object | None = None
    metrics: RequestMetrics = None  # type: ignore[assignment]
    last_emit_time: float | None = None
    # prefix cache (owned by workers.scheduler; see workers.block_manager)
    hash_root: bytes = b""
    """Digest the request's block-hash chain starts from (model, adapter, block size, cache_salt)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Digests of the first full blocks of `all_token_ids`, extended as needed (committed tokens only)."""
    num_registered_blocks: int = 0
    """Leading blocks of `block_table` named in the prefix cache (hits plus blocks registered after a step)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at first admission (usage `cached_tokens`)."""

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without building the whole prompt + output list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt rows still need logits (prompt logprobs requested and not all gathered): such a
        request must compute its whole prompt (no prefix-cache hit may skip rows)."""
        n = self.params.prompt_logprobs
        return n is not None and len(self.prompt_logprobs or ()) < self.num_prompt_tokens - 1

    @property
    def grammar_ready(self) -> bool:
        """Unconstrained, or its matcher is compiled: the request may sample its next token."""
        return self.params.structured_outputs is None or self.grammar is not None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def hashes_upto(self, num_blocks: int, block_size: int) -> list[bytes]:
        """`block_hashes` holding at least the first `num_blocks` full blocks' digests."""
        have = len(self.block_hashes)
        if have < num_blocks:
            parent = self.block_hashes[-1] if have else self.hash_root
            self.block_hashes += chain_from(parent, self.token_slice(have * block_size, num_blocks * block_size), block_size)
        return self.block_hashes

    def clear_drafts(self) -> None:
        self.drafts = []
        self.draft_logits = None
