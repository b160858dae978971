"""The idlm-serve Grafana dashboard, defined as plain dataclasses (the pattern of Ray's own
dashboards: `ray/dashboard/modules/metrics/dashboards/common.py`, no grafanalib / foundation SDK).

Owns: `Target`, `Panel`, `Row`, `Variable`, `Dashboard`, the panel list (`DASHBOARDS`) and
`SERVE_METRICS`, the Ray Serve metric families the panels read (names checked against Ray's source
by the tests). Engine metric names come from `cluster.metric_names`, the exporter's vocabulary.

Queries use Grafana variables: `$model`, `$mode`, `$replica` (engine labels), `$application`
(Ray Serve), `$__rate_interval`, and the `${datasource}` Prometheus data source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.metric_names import COUNTERS, GAUGES, HISTOGRAMS

# Ray Serve's own metric families used here (prefix `ray_` added by Ray; counters get `_total`).
# Sources (Ray 2.60): serve/_private/request_ingress_metrics.py (HTTP proxy: serve_num_{http}_requests,
# serve_num_{http}_error_requests, serve_{http}_request_latency_ms, serve_num_ongoing_{http}_requests)
# and serve/_private/deployment_state.py (serve_deployment_replica_healthy).
SERVE_METRICS = {
    "serve_num_http_requests": "counter",
    "serve_num_http_error_requests": "counter",
    "serve_http_request_latency_ms": "histogram",
    "serve_num_ongoing_http_requests": "gauge",
    "serve_deployment_replica_healthy": "gauge",
    "serve_deployment_request_counter": "counter",
    "serve_deployment_processing_latency_ms": "histogram",
}

ENGINE = 'model=~"$model",mode=~"$mode",replica=~"$replica"'
SERVE = 'application=~"$application"'
RI = "$__rate_interval"


def m(name: str, suffix: str = "") -> str:
    """Exported engine metric name (`ray_` prefix, `_total` for counters); refuses unknown names."""
    if name in COUNTERS:
        assert suffix == "", name
        return f"ray_{name}_total"
    if name in GAUGES:
        assert suffix == "", name
        return f"ray_{name}"
    if name in HISTOGRAMS:
        assert suffix in ("_bucket", "_sum", "_count"), name
        return f"ray_{name}{suffix}"
    raise KeyError(f"{name} is not in cluster.metric_names")


def s(name: str, suffix: str = "") -> str:
    """Exported Ray Serve metric name."""
    kind = SERVE_METRICS[name]
    if kind == "counter":
        return f"ray_{name}_total"
    if kind == "histogram":
        assert suffix in ("_bucket", "_sum", "_count"), name
    return f"ray_{name}{suffix}"


def rate(metric: str, sel: str = ENGINE) -> str:
    return f"rate({metric}{{{sel}}}[{RI}])"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    width: int = 12
    height: int = 8
    stack: bool = False
    min: float | None = None
    max: float | None = None


@dataclass
class Row:
    title: str
    panels: list[Panel]


@dataclass
class Variable:
    """A `query` variable: `label_values(<metric>, <label>)`."""

    name: str
    label: str
    metric: str
    label_name: str
    selector: str = ""


@dataclass
class Dashboard:
    uid: str
    title: str
    filename: str
    description: str
    rows: list[Row]
    variables: list[Variable]
    tags: list[str] = field(default_factory=lambda: ["idlm", "ray-serve", "llm"])
    refresh: str = "30s"
    time_from: str = "now-1h"

    def panels(self) -> list[Panel]:
        return [p for r in self.rows for p in r.panels]

    def targets(self) -> list[Target]:
        return [t for p in self.panels() for t in p.targets]


def _quantiles(hist: str, sel: str, by: str = "") -> list[Target]:
    by_l = f"{by}, le" if by else "le"
    return [
        Target(
            f"histogram_quantile({q}, sum by ({by_l}) (rate({hist}{{{sel}}}[{RI}])))",
            f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in (0.5, 0.95, 0.99)
    ]


_GEN = m("idlm_generation_tokens")
_FWD = m("idlm_decode_forwards")
_ACC = m("idlm_accepted_tokens")
_DRAFT = m("idlm_draft_tokens")
_BY = "model, mode, stride"
_VERIFY = ENGINE + ',kind=~"verify_accept|verify_reject"'

ISD = Row("Throughput and introspective strided decoding", [
    Panel("Token throughput", "Committed (generated) and prompt tokens per second, per model.", [
        Target(f"sum by (model) ({rate(_GEN)})", "generated {{model}}"),
        Target(f"sum by (model) ({rate(m('idlm_prompt_tokens'))})", "prompt {{model}}"),
    ], unit="tokens/s"),
    Panel("Tokens per forward (TPF)",
          "rate(generation tokens) / rate(decode forwards): tokens committed per model forward of a "
          "request. 1 for AR; up to the stride N for ISD. Dashed: per-request TPF median.", [
              Target(f"sum by ({_BY}) ({rate(_GEN)}) / sum by ({_BY}) ({rate(_FWD)})",
                     "TPF {{model}} {{mode}} N={{stride}}"),
              Target(f"histogram_quantile(0.5, sum by (model, le) "
                     f"({rate(m('idlm_request_tokens_per_forward', '_bucket'))}))", "per-request p50 {{model}}"),
          ], unit="short", min=0),
    Panel("Draft acceptance rate", "rate(accepted drafts) / rate(verified drafts).", [
        Target(f"sum by ({_BY}) ({rate(_ACC)}) / sum by ({_BY}) ({rate(_DRAFT)})",
               "{{model}} {{mode}} N={{stride}}"),
    ], unit="percentunit", min=0, max=1),
    Panel("Acceptance by draft position",
          "Accepted drafts at each draft position per verify round (verify_accept + verify_reject).", [
              Target(f"sum by (position) ({rate(m('idlm_accepted_tokens_per_pos'))}) / on() group_left() "
                     f"sum({rate(m('idlm_rounds'), _VERIFY)})",
                     "position {{position}}"),
          ], unit="percentunit", min=0, max=1),
    Panel("ISD rounds by kind", "Rounds per second: cold, verify_accept (all drafts accepted), verify_reject.", [
        Target(f"sum by (kind) ({rate(m('idlm_rounds'))})", "{{kind}}"),
    ], unit="ops", stack=True),
    Panel("Rounds by stride (adaptive stride)",
          "Decode rounds per second by the stride n each ran with: long strides under light load "
          "(memory-bound forwards), n = 1 (AR) under heavy load.", [
              Target(f"sum by (stride) ({rate(m('idlm_rounds_by_stride'))})", "n={{stride}}"),
          ], unit="ops", stack=True),
    Panel("Stride guard: steps by arm (adaptive stride)",
          "Decode steps per second run with the stride policy's choice (policy) or all AR (ar) because "
          "drafting was measured slower at that load. Mostly ar: ISD does not pay at this load here.", [
              Target(f"sum by (arm) ({rate(m('idlm_stride_guard_steps'))})", "{{arm}}"),
          ], unit="ops", stack=True),
    Panel("Step time: cost model vs measured",
          "The adaptive stride's step-cost model (predicted) against measured step time, moving "
          "averages over decode steps, per replica. Far apart: the model is re-learning.", [
              Target(f"max by (replica) ({m('idlm_step_time_predicted_seconds')}{{{ENGINE}}})", "predicted {{replica}}"),
              Target(f"max by (replica) ({m('idlm_step_time_measured_seconds')}{{{ENGINE}}})", "measured {{replica}}"),
          ], unit="s", min=0),
    Panel("Finished requests by reason", "Finished requests per second by finish_reason.", [
        Target(f"sum by (finish_reason) ({rate(m('idlm_requests'))})", "{{finish_reason}}"),
    ], unit="reqps", stack=True),
])

LATENCY = Row("Engine latency", [
    Panel("Time to first token", "TTFT p50 / p95 / p99.",
          _quantiles(m("idlm_time_to_first_token_seconds", "_bucket"), ENGINE), unit="s"),
    Panel("Inter-token latency", "ITL p50 / p95 / p99 (tokens committed in one forward share the interval).",
          _quantiles(m("idlm_inter_token_latency_seconds", "_bucket"), ENGINE), unit="s"),
    Panel("End-to-end request latency", "E2E p50 / p95 / p99.",
          _quantiles(m("idlm_e2e_request_latency_seconds", "_bucket"), ENGINE), unit="s"),
    Panel("Engine step duration", "Duration of one engine step (one batched forward), p50 / p95 / p99.",
          _quantiles(m("idlm_step_duration_seconds", "_bucket"), ENGINE), unit="s"),
])

SCHED = Row("Scheduler and KV cache", [
    Panel("Running / waiting requests", "Requests in the running batch and waiting for admission, per replica.", [
        Target(f"sum by (replica) ({m('idlm_num_requests_running')}{{{ENGINE}}})", "running {{replica}}"),
        Target(f"sum by (replica) ({m('idlm_num_requests_waiting')}{{{ENGINE}}})", "waiting {{replica}}"),
    ]),
    Panel("KV cache usage", "Fraction of paged KV blocks in use, per replica.", [
        Target(f"max by (replica) ({m('idlm_kv_cache_usage_ratio')}{{{ENGINE}}})", "{{replica}}"),
    ], unit="percentunit", min=0, max=1),
    Panel("Engine replicas", "Engine replicas exporting metrics, per model.", [
        Target(f"count by (model) ({m('idlm_num_requests_running')}{{{ENGINE}}})", "{{model}}"),
    ], min=0),
    Panel("Healthy Serve replicas", "Ray Serve's healthy-replica gauge per deployment.", [
        Target(f"sum by (deployment) ({s('serve_deployment_replica_healthy')}{{{SERVE}}})", "{{deployment}}"),
    ], min=0),
])

SERVE_ROW = Row("Ray Serve HTTP", [
    Panel("HTTP requests", "Requests per second at the Serve HTTP proxy, by route and status code.", [
        Target(f"sum by (route, status_code) ({rate(s('serve_num_http_requests'), SERVE)})",
               "{{route}} {{status_code}}"),
    ], unit="reqps"),
    Panel("HTTP errors", "Error responses per second at the Serve HTTP proxy, by error code.", [
        Target(f"sum by (error_code) ({rate(s('serve_num_http_error_requests'), SERVE)})", "{{error_code}}"),
    ], unit="reqps"),
    Panel("HTTP latency", "Serve proxy end-to-end latency p50 / p95 / p99.",
          _quantiles(s("serve_http_request_latency_ms", "_bucket"), SERVE), unit="ms"),
    Panel("Deployment processing latency", "Replica-side processing latency p95 per deployment.", [
        Target(f"histogram_quantile(0.95, sum by (deployment, le) "
               f"({rate(s('serve_deployment_processing_latency_ms', '_bucket'), SERVE)}))", "p95 {{deployment}}"),
    ], unit="ms"),
    Panel("Ongoing HTTP requests", "Requests in flight at the Serve HTTP proxies.", [
        Target(f"sum({s('serve_num_ongoing_http_requests')})", "ongoing"),
    ]),
    Panel("Deployment request rate", "Requests per second handled by each deployment's replicas.", [
        Target(f"sum by (deployment) ({rate(s('serve_deployment_request_counter'), SERVE)})", "{{deployment}}"),
    ], unit="reqps"),
])

_QUERIES = m("idlm_prefix_cache_queries")
_HITS = m("idlm_prefix_cache_hits")
_DECISIONS = m("idlm_router_decisions")
CACHE = Row("Prefix cache and routing", [
    Panel("Prefix-cache hit rate",
          "rate(prefix-cache hit tokens) / rate(lookup tokens): the share of admitted prompt tokens whose KV "
          "was reused (re-admissions after preemption excluded), over all replicas and per replica.", [
              Target(f"sum by (model) ({rate(_HITS)}) / sum by (model) ({rate(_QUERIES)})", "{{model}}"),
              Target(f"sum by (replica) ({rate(_HITS)}) / sum by (replica) ({rate(_QUERIES)})", "{{replica}}"),
          ], unit="percentunit", min=0, max=1),
    Panel("Prompt tokens: computed vs cached",
          "Prompt tokens per second served from the prefix cache and those the engine had to compute.", [
              Target(f"sum by (model) ({rate(_HITS)})", "cached {{model}}"),
              Target(f"sum by (model) ({rate(_QUERIES)}) - sum by (model) ({rate(_HITS)})", "computed {{model}}"),
          ], unit="tokens/s", stack=True),
    Panel("Cached blocks and evictions",
          "KV blocks holding a cached prefix per replica, and cached blocks evicted per second (LRU) to make room.", [
              Target(f"max by (replica) ({m('idlm_kv_cache_cached_blocks')}{{{ENGINE}}})", "cached {{replica}}"),
              Target(f"sum by (replica) ({rate(m('idlm_prefix_cache_evictions'))})", "evicted/s {{replica}}"),
          ], min=0),
    Panel("Router decisions",
          "Requests per second by the prefix router's outcome: affinity (cache match), cold (new prefix, "
          "rendezvous), imbalance (best match overloaded, placed by load), spill (first choice full), fallback.", [
              Target(f"sum by (outcome) ({rate(_DECISIONS)})", "{{outcome}}"),
          ], unit="reqps", stack=True),
    Panel("Requests routed per replica", "Routed requests per second by the replica the router chose.", [
        Target(f"sum by (replica) ({rate(_DECISIONS)})", "{{replica}}"),
    ], unit="reqps", stack=True),
])

_RUNNING = m("idlm_num_requests_running")
IDLM = Dashboard(
    uid="idlm-serve",
    title="idlm-serve: I-DLM serving",
    filename="idlm-serve.json",
    description="Throughput, tokens per forward, draft acceptance, latency, scheduler, prefix cache, routing and Ray Serve metrics "
                "of idlm-serve (generated by `python -m cluster.dashboards build`; do not edit by hand).",
    rows=[ISD, LATENCY, SCHED, CACHE, SERVE_ROW],
    variables=[
        Variable("model", "Model", _RUNNING, "model"),
        Variable("mode", "Mode", _RUNNING, "mode", 'model=~"$model"'),
        Variable("replica", "Replica", _RUNNING, "replica", 'model=~"$model",mode=~"$mode"'),
        Variable("application", "Serve application", s("serve_deployment_replica_healthy"), "application"),
    ],
)

DASHBOARDS: list[Dashboard] = [IDLM]
