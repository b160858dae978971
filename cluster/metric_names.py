"""The Prometheus metric vocabulary of idlm-serve (DESIGN §3), as exported by Ray (which adds the
`ray_` prefix). Pure data: the exporter, the dashboards and the tests all read it from here."""

COUNTERS = {
    "idlm_prompt_tokens": "Prompt tokens admitted.",
    "idlm_generation_tokens": "Tokens committed (returned to clients).",
    "idlm_decode_forwards": "Forwards per request that committed tokens (TPF denominator).",
    "idlm_draft_tokens": "ISD drafts verified.",
    "idlm_accepted_tokens": "ISD drafts accepted.",
    "idlm_accepted_tokens_per_pos": "ISD drafts accepted, by draft position.",
    "idlm_rounds": "ISD rounds by kind (cold, verify_accept, verify_reject).",
    "idlm_requests": "Finished requests by finish reason.",
    "idlm_rounds_by_stride": "Decode rounds by the stride n they ran with (label `stride` = the round's n; "
                             "the adaptive stride picks n in 1..N).",
    "idlm_stride_guard_steps": "Adaptive stride: decode steps by the arm of the measured guard (label `arm`: policy = "
                               "the stride policy's choice, ar = every request at stride 1 where drafting measured slower).",
    "idlm_prefix_cache_queries": "Prefix-cache lookups in tokens (prompt tokens of admitted requests; "
                                 "re-admissions after preemption excluded).",
    "idlm_prefix_cache_hits": "Prefix-cache hits in tokens (tokens whose KV was reused, same requests as queries).",
    "idlm_prefix_cache_evictions": "Cached KV blocks evicted (least recently used) to make room.",
    "idlm_router_decisions": "Routing decisions of the ingress's prefix router by outcome (affinity, cold, "
                             "imbalance, fallback, spill); label `replica` = the replica chosen.",
}
ROUTER_COUNTERS = ("idlm_router_decisions",)
"""Exported by the ingress process (cluster.router), not by the engine replicas."""
GAUGES = {
    "idlm_num_requests_running": "Requests in the running batch.",
    "idlm_num_requests_waiting": "Requests waiting for admission.",
    "idlm_kv_cache_usage_ratio": "Fraction of KV blocks in use (held by requests; free cached blocks excluded).",
    "idlm_kv_cache_cached_blocks": "KV blocks holding a cached prefix (in use or free and evictable).",
    "idlm_step_time_predicted_seconds": "Adaptive stride: the step-cost model's predicted step time (moving average).",
    "idlm_step_time_measured_seconds": "Adaptive stride: the measured step time of the same steps (moving average).",
}
HISTOGRAMS = {
    "idlm_time_to_first_token_seconds": "Time to first token.",
    "idlm_inter_token_latency_seconds": "Inter-token latency (tokens committed together share the interval).",
    "idlm_e2e_request_latency_seconds": "End-to-end request latency.",
    "idlm_request_tokens_per_forward": "Tokens per forward of each finished request.",
    "idlm_step_duration_seconds": "Engine step duration.",
}
LABELS = ("model", "mode", "stride", "replica")
"""Labels of every engine series; `stride` is the configured (maximum) stride N, except on
`idlm_rounds_by_stride`, where it is the stride the round ran with."""


def exported_names() -> list[str]:
    """Names as they appear on Ray's Prometheus endpoint."""
    names = [f"ray_{n}_total" for n in COUNTERS] + [f"ray_{n}" for n in GAUGES]
    names += [f"ray_{n}_{s}" for n in HISTOGRAMS for s in ("bucket", "sum", "count")]
    return names
