"""Continuous-batching scheduler with catch-up token accounting (vLLM V1 style).

Owns: the waiting and running queues, the per-step token budget, KV block allocation for every
row a step feeds (ISD drafts and MASK rows included), chunked prefill, and preemption.

Each step every scheduled request feeds `all_token_ids[num_computed:]` (a prefill chunk, or just
`pending` in decode), and when those reach its last token the block is extended with its drafts
and MASK rows (a "final" item: the forward returns logits for it). Running requests go first, so
decode blocks are never starved by new prompts; waiting prompts fill what budget is left.

Strides: `workers.stride.StridePolicy` gives every decoding request its stride n for the step (the
configured stride N is the maximum; a fixed-stride engine always gets N). A request verifies the
first n-1 of its drafts (the rest are dropped) and carries n-1 MASK rows.

When the KV cache cannot hold a running request's next block, the most recently admitted running
request is preempted: its blocks are freed and it goes back to the front of the waiting queue with
its committed output intact; on readmission its prompt + output are recomputed (prefill), so it
continues exactly where it stopped. No request is lost or corrupted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.block_manager import BlockManager
from workers.config import EngineConfig
from workers.request import Request, RequestStatus
from workers.stride import StridePolicy


@dataclass
class ScheduledItem:
    request: Request
    num_real: int
    """Tokens of `all_token_ids[num_computed:]` fed this step."""
    num_drafts: int = 0
    num_masks: int = 0
    final: bool = False
    """True when the chunk reaches the request's last token: logits come back for it."""
    stride: int = 1
    """The round's stride n (final items): up to n-1 drafts verified, up to n-1 MASK rows."""

    @property
    def num_rows(self) -> int:
        return self.num_real + self.num_drafts + self.num_masks


@dataclass
class SchedulerOutput:
    items: list[ScheduledItem] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(it.num_rows for it in self.items)


class Scheduler:
    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int, policy: StridePolicy | None = None
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.max_model_len = max_model_len
        self.stride = config.stride
        self.policy = policy or StridePolicy(config.stride, adaptive=False)
        self.new_stride = config.stride
        """Stride of requests entering decode this step (chosen with the engine-wide acceptance)."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- queue management -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Drops a request from either queue and frees its KV (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.block_table)
        req.status = RequestStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- per-step plan -----------------------------------------------------------------------
    def num_masks(self, req: Request, num_drafts: int, stride: int | None = None) -> int:
        """MASK rows worth computing: the next round emits at most masks + 1 tokens, so drafts past
        what max_tokens (or the context) still allows would be thrown away."""
        stride = self.stride if stride is None else stride
        if stride <= 1:
            return 0
        after_round = min(req.remaining_tokens, self.max_model_len - req.num_tokens) - (num_drafts + 1)
        return max(0, min(stride - 1, after_round - 1))

    def _plan(self, req: Request, budget: int) -> ScheduledItem | None:
        num_real = req.num_tokens - req.num_computed
        n = req.stride if num_real == 1 and req.stride else self.new_stride
        k = min(len(req.drafts), n - 1)  # a longer draft sequence is cut: its tail is never verified
        m = self.num_masks(req, k, n)
        if num_real + k + m <= budget:
            return ScheduledItem(req, num_real, k, m, final=True, stride=n)
        if num_real > 1 and budget > 0:
            # Chunked prefill: stop short of the last token so no logits are needed yet.
            return ScheduledItem(req, min(budget, num_real - 1))
        return None

    def _choose_strides(self) -> None:
        """Strides for this step's decoding requests (see `workers.stride`)."""
        if not self.policy.adaptive:
            return
        decoding, other = [], 0
        for r in self.running:
            if r.num_tokens - r.num_computed == 1:
                decoding.append(r)
            else:
                other += r.num_tokens - r.num_computed
        budget = max(self.config.max_num_batched_tokens - len(decoding), 0)
        for r in self.waiting:
            if other >= budget:
                break
            other += r.num_tokens - r.num_computed
        other = min(other, budget)
        strides, self.new_stride = self.policy.choose([r.accept_state for r in decoding], other)
        for r, n in zip(decoding, strides):
            r.stride = n

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.blocks.free(victim.block_table)
        victim.num_computed = 0
        victim.clear_drafts()
        victim.status = RequestStatus.WAITING
        victim.metrics.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._choose_strides()
        scheduled: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            item = self._plan(req, budget)
            if item is None:
                break
            need_tokens = req.num_computed + item.num_rows
            while not self.blocks.can_grow(req.block_table, need_tokens):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            self.blocks.grow(req.block_table, need_tokens)
            out.items.append(item)
            scheduled.add(req.request_id)
            budget -= item.num_rows
            i += 1
        # Admit waiting requests (new prompts and preempted ones) into what is left.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            item = self._plan(req, budget)
            if item is None:
                break
            need_tokens = req.num_computed + item.num_rows
            if not self.blocks.can_grow(req.block_table, need_tokens):
                break
            self.blocks.grow(req.block_table, need_tokens)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.items.append(item)
            budget -= item.num_rows
        return out

    def commit(self, item: ScheduledItem, num_accepted: int) -> None:
        """After the forward: KV of the real rows (and of accepted drafts) is kept, MASK rows and
        rejected drafts are rolled back by trimming the block table to the valid length."""
        req = item.request
        req.num_computed += item.num_real + (num_accepted if item.final else 0)
        # Keep blocks for the valid KV plus the pending token's slot.
        self.blocks.trim(req.block_table, req.num_computed + 1)
