"""The exported metric vocabulary is exactly DESIGN §3's (with Ray's `ray_` prefix)."""

from cluster.metric_names import COUNTERS, GAUGES, HISTOGRAMS, LABELS, exported_names

DESIGN_COUNTERS = [
    "idlm_prompt_tokens_total", "idlm_generation_tokens_total", "idlm_decode_forwards_total",
    "idlm_draft_tokens_total", "idlm_accepted_tokens_total", "idlm_accepted_tokens_per_pos_total",
    "idlm_rounds_total", "idlm_requests_total",
    "idlm_rounds_by_stride_total",  # DESIGN §3 "added with the features that need them": adaptive stride
    "idlm_stride_guard_steps_total",  # the adaptive stride's measured guard (workers.draft_guard)
    # prefix caching and the prefix router
    "idlm_prefix_cache_queries_total", "idlm_prefix_cache_hits_total", "idlm_prefix_cache_evictions_total",
    "idlm_router_decisions_total",
]
DESIGN_GAUGES = ["idlm_num_requests_running", "idlm_num_requests_waiting", "idlm_kv_cache_usage_ratio",
                 "idlm_kv_cache_cached_blocks",  # prefix caching
                 # the adaptive stride's cost model, predicted vs measured (docs/benchmarks.md)
                 "idlm_step_time_predicted_seconds", "idlm_step_time_measured_seconds"]
DESIGN_HISTOGRAMS = [
    "idlm_time_to_first_token_seconds", "idlm_inter_token_latency_seconds", "idlm_e2e_request_latency_seconds",
    "idlm_request_tokens_per_forward", "idlm_step_duration_seconds",
]


def test_vocabulary_matches_design():
    # counters are registered without `_total`; Prometheus adds it
    assert sorted(f"{n}_total" for n in COUNTERS) == sorted(DESIGN_COUNTERS)
    assert sorted(GAUGES) == sorted(DESIGN_GAUGES)
    assert sorted(HISTOGRAMS) == sorted(DESIGN_HISTOGRAMS)
    assert LABELS == ("model", "mode", "stride", "replica")
    names = set(exported_names())
    assert {f"ray_{n}" for n in DESIGN_COUNTERS + DESIGN_GAUGES} <= names
    assert {f"ray_{n}_bucket" for n in DESIGN_HISTOGRAMS} <= names
