"""Exports one engine's stats as Prometheus metrics through Ray's metrics agent.

Owns: `EngineMetricsExporter`, which periodically diffs the engine's cumulative `EngineStats`
into `ray.util.metrics` counters, sets gauges and drains per-event observations into histograms.
Labels: model, mode, stride, replica (plus `position`, `kind`, `finish_reason` where DESIGN §3 says).

Naming: a `ray.util.metrics.Counter("idlm_prompt_tokens")` appears on Ray's Prometheus endpoint as
`ray_idlm_prompt_tokens_total` (Ray adds `ray_`, the Prometheus exporter adds `_total` to counters),
so counters are registered *without* `_total` and come out exactly as the DESIGN §3 names.
Gauges and histograms keep their names (`ray_idlm_kv_cache_usage_ratio`,
`ray_idlm_step_duration_seconds_bucket/_sum/_count`). `cluster.metric_names.exported_names()` lists
them all; the e2e test scrapes Ray's endpoint for every one.

Export: every 0.5 s (and on each `stats()` call) the replica takes a cumulative `EngineStats`
snapshot, adds the difference to the previous snapshot to the counters, sets the gauges, and
drains the engine's per-event `Observations` into the histograms. Ray counters only take positive
increments, so a counter series appears with its first event.

Derived figures (PromQL used by the dashboards):
  TPF        = sum(rate(ray_idlm_generation_tokens_total[1m])) / sum(rate(ray_idlm_decode_forwards_total[1m]))
  acceptance = sum(rate(ray_idlm_accepted_tokens_total[1m])) / sum(rate(ray_idlm_draft_tokens_total[1m]))
  prefix-cache hit rate = sum(rate(ray_idlm_prefix_cache_hits_total[1m])) / sum(rate(ray_idlm_prefix_cache_queries_total[1m]))
The router's `idlm_router_decisions` counter is registered by cluster.router in the ingress process.
"""

from __future__ import annotations

from ray.util import metrics as rm

from cluster.metric_names import COUNTERS, GAUGES, HISTOGRAMS, LABELS, ROUTER_COUNTERS
from workers.stats import EngineStats, Observations

_BUCKETS = {
    "idlm_time_to_first_token_seconds": [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    "idlm_inter_token_latency_seconds": [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    "idlm_e2e_request_latency_seconds": [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    "idlm_request_tokens_per_forward": [1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 12, 16],
    "idlm_step_duration_seconds": [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
}
_OBS_FIELD = {
    "idlm_time_to_first_token_seconds": "time_to_first_token",
    "idlm_inter_token_latency_seconds": "inter_token_latency",
    "idlm_e2e_request_latency_seconds": "e2e_request_latency",
    "idlm_request_tokens_per_forward": "request_tokens_per_forward",
    "idlm_step_duration_seconds": "step_duration",
}


class EngineMetricsExporter:
    def __init__(self, model: str, mode: str, stride: int, replica: str) -> None:
        self.tags = {"model": model, "mode": mode, "stride": str(stride), "replica": replica}
        extra = {"idlm_accepted_tokens_per_pos": ("position",), "idlm_rounds": ("kind",), "idlm_requests": ("finish_reason",),
                 "idlm_stride_guard_steps": ("arm",)}
        self.counters = {n: rm.Counter(n, d, tag_keys=LABELS + extra.get(n, ())) for n, d in COUNTERS.items()
                         if n != "idlm_rounds_by_stride" and n not in ROUTER_COUNTERS}
        # its `stride` label is the round's stride (not the configured maximum, which it replaces)
        self.counters["idlm_rounds_by_stride"] = rm.Counter(
            "idlm_rounds_by_stride", COUNTERS["idlm_rounds_by_stride"], tag_keys=LABELS)
        self.gauges = {n: rm.Gauge(n, d, tag_keys=LABELS) for n, d in GAUGES.items()}
        self.hists = {n: rm.Histogram(n, d, boundaries=_BUCKETS[n], tag_keys=LABELS) for n, d in HISTOGRAMS.items()}
        self.prev = EngineStats()
        # Gauges exist from the start; Ray counters only accept positive increments, so a counter
        # series appears with its first event.
        for g in self.gauges.values():
            g.set(0.0, tags=self.tags)

    def update(self, st: EngineStats, obs: Observations) -> None:
        p, c, t = self.prev, self.counters, self.tags
        for name, field in (
            ("idlm_prompt_tokens", "prompt_tokens"),
            ("idlm_generation_tokens", "generation_tokens"),
            ("idlm_decode_forwards", "decode_forwards"),
            ("idlm_draft_tokens", "draft_tokens"),
            ("idlm_accepted_tokens", "accepted_tokens"),
            ("idlm_prefix_cache_queries", "prefix_cache_queries"),
            ("idlm_prefix_cache_hits", "prefix_cache_hits"),
            ("idlm_prefix_cache_evictions", "prefix_cache_evictions"),
        ):
            d = getattr(st, field) - getattr(p, field)
            if d > 0:
                c[name].inc(d, tags=t)
        for i, v in enumerate(st.accepted_per_pos):
            d = v - (p.accepted_per_pos[i] if i < len(p.accepted_per_pos) else 0)
            if d > 0:
                c["idlm_accepted_tokens_per_pos"].inc(d, tags={**t, "position": str(i)})
        for k, v in st.rounds.items():
            if v - p.rounds.get(k, 0) > 0:
                c["idlm_rounds"].inc(v - p.rounds.get(k, 0), tags={**t, "kind": k})
        for k, v in st.requests.items():
            if v - p.requests.get(k, 0) > 0:
                c["idlm_requests"].inc(v - p.requests.get(k, 0), tags={**t, "finish_reason": k})
        for k, v in st.stride_guard_steps.items():
            if v - p.stride_guard_steps.get(k, 0) > 0:
                c["idlm_stride_guard_steps"].inc(v - p.stride_guard_steps.get(k, 0), tags={**t, "arm": k})
        for n, v in st.rounds_by_stride.items():
            if v - p.rounds_by_stride.get(n, 0) > 0:
                c["idlm_rounds_by_stride"].inc(v - p.rounds_by_stride.get(n, 0), tags={**t, "stride": str(n)})
        self.gauges["idlm_num_requests_running"].set(st.num_running, tags=t)
        self.gauges["idlm_num_requests_waiting"].set(st.num_waiting, tags=t)
        self.gauges["idlm_kv_cache_usage_ratio"].set(st.kv_cache_usage, tags=t)
        self.gauges["idlm_kv_cache_cached_blocks"].set(st.kv_cache_cached_blocks, tags=t)
        self.gauges["idlm_step_time_predicted_seconds"].set(st.step_time_predicted, tags=t)
        self.gauges["idlm_step_time_measured_seconds"].set(st.step_time_measured, tags=t)
        for name, field in _OBS_FIELD.items():
            for v in getattr(obs, field):
                self.hists[name].observe(v, tags=t)
        self.prev = st
