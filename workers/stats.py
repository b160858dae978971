"""Engine statistics as plain dataclasses (no prometheus import here; `cluster.metrics` exports).

Owns: `EngineStats`, cumulative counters and gauges since engine start, and the per-event
observations (latencies, per-request TPF, step durations) that exporters drain into histograms.

Derived figures (also the PromQL of the dashboards):
  TPF        = generation_tokens / decode_forwards
  acceptance = accepted_tokens / draft_tokens
  prefix-cache hit rate = prefix_cache_hits / prefix_cache_queries
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

ROUND_KINDS = ("cold", "verify_accept", "verify_reject")
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Observations:
    """Events since the last drain; each list feeds one histogram."""

    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)
    e2e_request_latency: list[float] = field(default_factory=list)
    request_tokens_per_forward: list[float] = field(default_factory=list)
    step_duration: list[float] = field(default_factory=list)


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    decode_forwards: int = 0
    """Per request per forward that committed tokens for it."""
    draft_tokens: int = 0
    """Drafts that were verified."""
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    drafts_per_pos: list[int] = field(default_factory=list)
    rounds: dict[str, int] = field(default_factory=lambda: {k: 0 for k in ROUND_KINDS})
    rounds_by_stride: dict[int, int] = field(default_factory=dict)
    """Decode rounds (forwards that committed tokens) by the stride n they ran with."""
    requests: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FINISH_REASONS})
    preemptions: int = 0
    steps: int = 0
    # prefix cache, in tokens (vLLM semantics): lookups at first admission; re-admissions after
    # preemption apart, so they do not inflate the hit rate
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_preempted_queries: int = 0
    prefix_cache_preempted_hits: int = 0
    prefix_cache_evictions: int = 0
    """Cached blocks dropped to reuse their space (blocks, cumulative)."""
    # gauges
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    kv_cache_cached_blocks: int = 0
    """Blocks holding a cached prefix (referenced or free and evictable)."""
    queued_prefill_tokens: int = 0
    """Prompt tokens admitted but not yet computed (waiting and running): the TTFT backlog."""
    step_time_predicted: float = 0.0
    """Adaptive stride: moving average of the cost model's step-time predictions (seconds) over
    decode-like steps (0 without adaptive stride)."""
    step_time_measured: float = 0.0
    """The measured durations of the same steps, same moving average."""
    stride_guard_steps: dict[str, int] = field(default_factory=dict)
    """Adaptive stride: decode-only steps run under each arm of the measured guard (`policy`: the
    stride policy's choice, `ar`: every request at stride 1 because drafting measured slower there)."""

    @property
    def tokens_per_forward(self) -> float:
        return self.generation_tokens / self.decode_forwards if self.decode_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def add_prefix_cache(self, c) -> None:
        """Adds one step's `workers.scheduler.PrefixCacheCounts`."""
        self.prefix_cache_queries += c.queries
        self.prefix_cache_hits += c.hits
        self.prefix_cache_preempted_queries += c.preempted_queries
        self.prefix_cache_preempted_hits += c.preempted_hits


class StatsCollector:
    """Thread-safe holder: the engine thread records, exporters snapshot and drain."""

    def __init__(self, stride: int) -> None:
        self._lock = threading.Lock()
        self.stats = EngineStats(
            accepted_per_pos=[0] * max(stride - 1, 0), drafts_per_pos=[0] * max(stride - 1, 0)
        )
        self.obs = Observations()

    def snapshot(self) -> EngineStats:
        with self._lock:
            return copy.deepcopy(self.stats)

    def drain(self) -> Observations:
        with self._lock:
            obs, self.obs = self.obs, Observations()
            return obs

    def __enter__(self) -> tuple[EngineStats, Observations]:
        self._lock.acquire()
        return self.stats, self.obs

    def __exit__(self, *exc) -> None:
        self._lock.release()
