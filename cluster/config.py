"""Serve application configuration: the `args` of `cluster.app:build_app`, validated by pydantic.

Owns: `AppConfig` (model source, decoding mode, engine limits, replica / ingress deployment options,
API key) with `extra="forbid"` at every level, so a misspelt or unsupported field fails at start
with a message naming it. `AppConfig.model_validate(args)` is the one validation entry point: the
app builder, the replicas and the helm chart's tests (serveConfigV2 `args`) all go through it.

    model: smollm2            # alias, HF directory, .gguf, or hub id in the local HF cache
    served_model_name: null   # the `model` clients send; default: `model`
    mode: isd                 # ar | isd | risd
    stride: 4                 # the most tokens per forward
    adaptive_stride: true     # each round pick every request's stride in 1..stride (load-adaptive)
    stride_guard: true        # adaptive: run AR at loads where drafting is measured slower
    draft_anchors: auto       # auto | every (MASK group after each real row: no cold rounds) | last
    enable_prefix_caching: true  # reuse KV of shared prefixes (system prompts, earlier turns)
    enforce_eager: false      # CUDA: no CUDA graphs for decode steps
    max_num_seqs: 32          # engine limits (workers.EngineConfig)
    logprobs_mode: raw_logprobs   # or processed_logprobs (after penalties, temperature, top-k/p)
    replica:
      num_replicas: 2         # or autoscaling_config: {min_replicas, max_replicas, target_ongoing_requests}
      max_ongoing_requests: 32
      max_queued_requests: 64
      ray_actor_options: {num_cpus: 1, num_gpus: 0}
      graceful_shutdown_timeout_s: 60   # in-flight streams drain this long when Serve stops a replica
    router:
      policy: prefix          # prefix (cache- and load-aware, cluster.router) | pow2 (Serve's default)
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workers.config import EngineConfig

__all__ = ["AppConfig", "AutoscalingConfig", "IngressOptions", "ReplicaOptions", "RouterOptions", "ActorOptions",
           "ValidationError"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActorOptions(_Strict):
    """Resources of one deployment replica (Ray actor)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources per replica, e.g. `{"idlm_slot": 1}` with each node started with
    `--resources='{"idlm_slot": 1}'` (or a KubeRay group's `rayStartParams.resources`): one
    replica per node, so replicas spread over the nodes and a lost node's replica comes back on
    that node when it returns (docs/reliability.md)."""


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling (the subset we support; names as in `serve.config.AutoscalingConfig`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0)
    look_back_period_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        return self


class ReplicaOptions(_Strict):
    """Options of the engine replica deployment. `num_replicas` and `autoscaling_config` exclude
    each other; `max_queued_requests` bounds the queue (-1 would make it unbounded, so it is refused)."""

    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=0)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_wait_loop_s: float = Field(2.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0)
    """A replica that Serve stops (rolling update, scale-down, `serve.delete`, idlm-serve run's
    SIGTERM drain) first waits for its in-flight requests, streams included, checking every
    `graceful_shutdown_wait_loop_s`; only after this long are the rest cut (an in-band SSE error /
    503). Set it above the longest generation you serve (Serve's own default is 20 s)."""

    @model_validator(mode="after")
    def _one_of(self) -> ReplicaOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    def deployment_options(self) -> dict:
        opts: dict = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options.model_dump(),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


class IngressOptions(_Strict):
    """Options of the HTTP ingress deployment (cheap: validation, templating, tokenization)."""

    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(512, ge=0)
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.1))
    graceful_shutdown_wait_loop_s: float = Field(2.0, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0)
    """As the replica's; None: the replica's + 10 s. An ingress replica being stopped keeps relaying
    its open streams, and outliving the engine replicas lets it turn a stream they cut at their
    timeout into a clean in-band error event instead of a dropped connection."""

    def deployment_options(self, replica_graceful_s: float) -> dict:
        graceful_s = self.graceful_shutdown_timeout_s
        return {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options.model_dump(),
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "graceful_shutdown_timeout_s": replica_graceful_s + 10.0 if graceful_s is None else graceful_s,
        }


class RouterOptions(_Strict):
    """How the ingress picks an engine replica (cluster.router_policy has the rules). `pow2` is Ray
    Serve's power-of-two choices on queue length; `prefix` scores prefix-cache match, queue length
    and KV usage (llm-d's scorers), with a per-request load gate and rendezvous placement of new
    prefixes."""

    policy: Literal["prefix", "pow2"] = "prefix"
    prefix_weight: float = Field(3.0, ge=0)
    queue_weight: float = Field(2.0, ge=0)
    kv_weight: float = Field(2.0, ge=0)
    match_threshold: float = Field(0.1, ge=0, le=1)
    """Matched fraction of the prompt's blocks below which a prefix counts as cold."""
    imbalance_abs: int = Field(8, ge=0)
    """Affinity yields (for that request) when its replica's queue exceeds the shortest by more than
    this many requests and by the factor `imbalance_rel`."""
    imbalance_rel: float = Field(1.5, ge=1)
    kv_usage_limit: float = Field(0.95, gt=0, le=1)
    """Replicas whose KV usage is above this are not chosen while another is below."""
    cold_policy: Literal["rendezvous", "pow2"] = "rendezvous"
    cold_balance: float = Field(0.1, ge=0)
    """Rendezvous placement skips replicas holding more than (1 + cold_balance) x their share."""
    cold_key_blocks: int = Field(4, ge=1)
    """Cold placement keys on the digest of block min(n, cold_key_blocks) - 1: a long shared system
    prompt keys its group, not the first block that every chat-templated prompt shares."""
    index_capacity_blocks: int | None = Field(None, ge=1)
    """Router's per-replica prefix index size; None: the replica's KV size in blocks."""
    max_prefix_blocks: int = Field(512, ge=1)
    """Most prompt blocks the ingress hashes and sends to the router."""
    stats_period_s: float = Field(1.0, gt=0)
    """How often Serve pulls each replica's routing stats (KV usage, queue, prefill backlog)."""
    stats_timeout_s: float = Field(5.0, gt=0)

    @classmethod
    def from_router_kwargs(cls, kwargs: dict) -> RouterOptions:
        """What `cluster.router` gets back from `request_router_kwargs` (the labels dropped)."""
        return cls.model_validate({k: v for k, v in kwargs.items() if k in cls.model_fields})

    def request_router_config(self, labels: dict) -> dict | None:
        """`RequestRouterConfig` fields of the engine deployment; None keeps Serve's default router."""
        if self.policy == "pow2":
            return None
        kwargs = self.model_dump(exclude={"policy", "max_prefix_blocks", "stats_period_s", "stats_timeout_s"})
        return {
            "request_router_class": "cluster.router:IdlmPrefixRouter",
            "request_router_kwargs": {**kwargs, **labels},
            "request_routing_stats_period_s": self.stats_period_s,
            "request_routing_stats_timeout_s": self.stats_timeout_s,
        }


API_KEY_ENV = "IDLM_API_KEY"


class AppConfig(_Strict):
    """The `args` of the Serve application (deploy/*.yaml, helm serveConfigV2)."""

    # what is served
    model: str = "smollm2"
    served_model_name: str | None = None
    mode: Literal["ar", "isd", "risd"] = "isd"
    stride: int = Field(4, ge=1, le=16)
    adaptive_stride: bool = True
    stride_guard: bool = True
    draft_anchors: Literal["auto", "last", "every"] = "auto"
    enable_prefix_caching: bool = True
    adapter: str | None = None
    mask_token_id: int | None = Field(None, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    enforce_eager: bool = False
    seed: int = 0
    # engine limits
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=2)
    kv_cache_tokens: int = Field(65536, ge=1)
    kv_block_size: int = Field(16, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    # sampling API
    max_logprobs: int = Field(20, ge=0)
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    # structured outputs
    grammar_drafts: Literal["masked", "unmasked"] = "masked"
    grammar_cache_mb: int = Field(256, ge=1)
    grammar_compile_timeout_s: float = Field(30.0, gt=0)
    # HTTP
    api_key: str | None = Field(None, min_length=1)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    # deployments
    replica: ReplicaOptions = Field(default_factory=ReplicaOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    router: RouterOptions = Field(default_factory=RouterOptions)

    @model_validator(mode="after")
    def _engine_valid(self) -> AppConfig:
        # EngineConfig's own checks (e.g. max_num_batched_tokens >= 2*stride) name the field too.
        self.to_engine_config()
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def resolved_api_key(self, environ: dict | None = None) -> str | None:
        """`api_key`, else the `IDLM_API_KEY` environment variable of the ingress process (how the
        Helm chart passes a Kubernetes Secret without writing the key into the RayService)."""
        env = os.environ if environ is None else environ
        return self.api_key or env.get(API_KEY_ENV) or None

    def to_engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            mode=self.mode,
            stride=self.stride,
            adaptive_stride=self.adaptive_stride,
            stride_guard=self.stride_guard,
            draft_anchors=self.draft_anchors,
            enable_prefix_caching=self.enable_prefix_caching,
            adapter=self.adapter,
            mask_token_id=self.mask_token_id,
            dtype=self.dtype,
            device=self.device,
            enforce_eager=self.enforce_eager,
            kv_block_size=self.kv_block_size,
            kv_cache_tokens=self.kv_cache_tokens,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            seed=self.seed,
            max_logprobs=self.max_logprobs,
            logprobs_mode=self.logprobs_mode,
            grammar_drafts=self.grammar_drafts,
            grammar_cache_mb=self.grammar_cache_mb,
            grammar_compile_timeout_s=self.grammar_compile_timeout_s,
        )
