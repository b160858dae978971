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

Prefix cache (`enable_prefix_caching`; workers.block_manager): an admitted request starts with the
longest cached run of full blocks of its tokens, short of its last token (which must be fed: it is
the ISD `pending` row whose logits start decoding), and computes only past them. After each step
its newly full blocks of committed, computed tokens are registered; MASK rows and rejected drafts
lie past `num_computed` and are never registered. A waiting request whose next uncached block is
being prefilled right now by a running request waits a step (SGLang's in-batch prefix sharing), so
requests arriving together (n samples, a burst on one system prompt) compute the prefix once.
Re-admissions after preemption are counted apart (`preempted_*`), as vLLM does.
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
    """The round's stride n (final items): up to n-1 drafts verified, up to n-1 MASK rows per group."""
    num_groups: int = 1
    """MASK groups of `num_masks // num_groups` rows each: 1 (after the last real row), or with
    `draft_anchors="every"` one per real row from the pending token on (num_drafts + 1)."""

    @property
    def num_rows(self) -> int:
        return self.num_real + self.num_drafts + self.num_masks


@dataclass
class PrefixCacheCounts:
    """Prefix-cache lookups of the requests admitted in one step, in tokens (vLLM semantics)."""

    queries: int = 0
    hits: int = 0
    preempted_queries: int = 0
    """Lookups of re-admitted (preempted) requests, kept apart so they do not inflate the hit rate."""
    preempted_hits: int = 0


@dataclass
class SchedulerOutput:
    items: list[ScheduledItem] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    cache: PrefixCacheCounts = field(default_factory=PrefixCacheCounts)

    @property
    def num_tokens(self) -> int:
        return sum(it.num_rows for it in self.items)


class Scheduler:
    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int, policy: StridePolicy | None = None,
        every_anchor: bool = False,
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.max_model_len = max_model_len
        self.stride = config.stride
        self.policy = policy or StridePolicy(config.stride, adaptive=False)
        self.every_anchor = every_anchor
        """Verify rounds carry a MASK group after every real row (`EngineConfig.draft_anchors`)."""
        self.new_stride = config.stride
        """Stride of requests entering decode this step (chosen with the engine-wide acceptance)."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.caching = config.enable_prefix_caching
        self.block_size = block_manager.block_size

    # -- queue management -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Drops a request from either queue and frees its KV (finish or abort); its full computed
        blocks stay in the prefix cache."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.register_computed(req)
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
        if not req.grammar_ready:
            # Its grammar is still compiling: prefill all but the last token meanwhile (the
            # compilation overlaps the prefill), then wait; other requests go on.
            return ScheduledItem(req, min(budget, num_real - 1)) if num_real > 1 and budget > 0 else None
        n = req.stride if num_real == 1 and req.stride else self.new_stride
        k = min(len(req.drafts), n - 1)  # a longer draft sequence is cut: its tail is never verified
        m = self.num_masks(req, k, n)
        g = k + 1 if self.every_anchor and k and m else 1
        if g > 1 and (num_real + k + g * m > budget or req.num_tokens + k + g * m > self.max_model_len):
            g = 1  # the groups do not fit this step (or the context): the one after the last draft
        if num_real + k + g * m <= budget:
            return ScheduledItem(req, num_real, k, g * m, final=True, stride=n, num_groups=g)
        if num_real > 1 and budget > 0:
            # Chunked prefill: stop short of the last token so no logits are needed yet.
            return ScheduledItem(req, min(budget, num_real - 1))
        return None

    def _choose_strides(self) -> None:
        """Strides for this step's decoding requests (see `workers.stride`)."""
        if not self.policy.adaptive:
            return
        decoding, other, pending = [], 0, 0
        for r in self.running:
            if r.num_tokens - r.num_computed == 1:
                decoding.append(r)
            else:
                other += r.num_tokens - r.num_computed
                pending += 1
        budget = max(self.config.max_num_batched_tokens - len(decoding), 0)
        for r in self.waiting:
            if other >= budget or len(decoding) + pending >= self.config.max_num_seqs:
                break
            other += r.num_tokens - r.num_computed
            pending += 1
        other = min(other, budget)
        strides, self.new_stride = self.policy.choose([r.accept_state for r in decoding], other, pending)
        for r, n in zip(decoding, strides):
            r.stride = n

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.blocks.free(victim.block_table)  # its cached blocks stay cached: re-admission re-hits
        victim.num_registered_blocks = 0
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
                if not req.grammar_ready:
                    i += 1
                    continue
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
        inflight = self._inflight() if self.caching and self.waiting else set()
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits = self._cache_hits(req)
            if self._next_block_inflight(req, len(hits), inflight):
                deferred.append(self.waiting.popleft())
                continue
            req.num_computed = len(hits) * self.block_size
            item = self._plan(req, budget)
            if item is None and not req.grammar_ready:
                req.num_computed = 0
                deferred.append(self.waiting.popleft())
                continue
            need_tokens = req.num_computed + (item.num_rows if item else 0)
            if item is None or not self.blocks.can_admit(hits, need_tokens):
                req.num_computed = 0
                break
            self.blocks.acquire(req.block_table, hits)
            self.blocks.grow(req.block_table, need_tokens)
            req.num_registered_blocks = len(hits)
            self._count_lookup(req, req.num_computed, out)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.items.append(item)
            budget -= item.num_rows
            if self.caching:
                inflight.update(self._computing(req))
        self.waiting.extendleft(reversed(deferred))
        return out

    # -- prefix cache ------------------------------------------------------------------------
    def _cache_hits(self, req: Request) -> list[int]:
        """Cached blocks for a waiting request: full blocks short of its last token. A request
        whose prompt logprobs are still to gather computes its whole prompt (as vLLM skips the
        cache for them): a hit would skip the rows that produce them."""
        if not self.caching or req.needs_prompt_logits:
            return []
        n = (req.num_tokens - 1) // self.block_size
        return self.blocks.lookup(req.hashes_upto(n, self.block_size), n)

    def _computing(self, req: Request) -> list[bytes]:
        """Digests of the full blocks a running request is still to compute and register."""
        n = req.num_tokens // self.block_size
        return req.hashes_upto(n, self.block_size)[req.num_registered_blocks : n]

    def _inflight(self) -> set[bytes]:
        return {h for r in self.running if r.num_tokens - r.num_computed > 1 for h in self._computing(r)}

    def _next_block_inflight(self, req: Request, num_hits: int, inflight: set[bytes]) -> bool:
        if not inflight or req.needs_prompt_logits:  # it takes no hits, so it has nothing to wait for
            return False
        n = (req.num_tokens - 1) // self.block_size
        return num_hits < n and req.block_hashes[num_hits] in inflight

    def _count_lookup(self, req: Request, hit_tokens: int, out: SchedulerOutput) -> None:
        if not self.caching:
            return
        c = out.cache
        if req.metrics.num_preemptions:
            c.preempted_queries += req.num_tokens
            c.preempted_hits += hit_tokens
        else:
            c.queries += req.num_tokens
            c.hits += hit_tokens
            req.num_cached_tokens = hit_tokens

    def register_computed(self, req: Request) -> None:
        """Names the request's full blocks of committed, computed tokens in the prefix cache."""
        if not self.caching:
            return
        # num_computed can pass num_tokens only when a stop cut an accepted block short.
        n = min(req.num_computed, req.num_tokens) // self.block_size
        if n > req.num_registered_blocks:
            self.blocks.register(req.block_table, req.hashes_upto(n, self.block_size), req.num_registered_blocks, n)
            req.num_registered_blocks = n

    def queued_prefill_tokens(self) -> int:
        """Prompt (and recompute) tokens not yet computed, waiting and running (a TTFT backlog)."""
        return sum(r.num_tokens - r.num_computed - 1 for r in (*self.waiting, *self.running))

    def commit(self, item: ScheduledItem, num_accepted: int) -> None:
        """After the forward: KV of the real rows (and of accepted drafts) is kept, MASK rows and
        rejected drafts are rolled back by trimming the block table to the valid length."""
        req = item.request
        req.num_computed += item.num_real + (num_accepted if item.final else 0)
        # Keep blocks for the valid KV plus the pending token's slot.
        self.blocks.trim(req.block_table, req.num_computed + 1)
        # Accepted drafts join the output only after this (engine._apply): their blocks are
        # registered at the next commit, or at `remove` when the request ends.
        self.register_computed(req)
