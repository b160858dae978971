"""Serve application configuration: the `args` of `cluster.app:build_app`, validated by pydantic.

Owns: `AppConfig` (model, decoding mode, engine limits, replica deployment options, API key) with
`extra="forbid"` everywhere, so a misspelt or unsupported field fails at start with a message
naming it. The helm chart's `serveConfigV2` is validated with this same model in tests.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.config import EngineConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineLimits(_Strict):
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=2)
    kv_cache_tokens: int = Field(65536, ge=16)
    kv_block_size: int = Field(16, ge=1)
    max_model_len: int | None = Field(None, ge=2)


class AutoscalingConfig(_Strict):
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
        return self


class ReplicaOptions(_Strict):
    num_replicas: int | None = Field(1, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _one_of(self) -> ReplicaOptions:
        if self.autoscaling_config is not None:
            self.num_replicas = None
        return self

    def deployment_options(self) -> dict:
        opts: dict = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class IngressOptions(_Strict):
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(512, ge=-1)
    num_cpus: float = Field(0.1, ge=0)


class AppConfig(_Strict):
    model: str = "smollm2"
    served_model_name: str | None = None
    mode: Literal["ar", "isd", "risd"] = "isd"
    stride: int = Field(4, ge=1, le=16)
    adapter: str | None = None
    mask_token_id: int | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    engine: EngineLimits = Field(default_factory=EngineLimits)
    api_key: str | None = None
    max_request_bytes: int = Field(1_000_000, ge=1024)
    replica: ReplicaOptions = Field(default_factory=ReplicaOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def to_engine_config(self) -> EngineConfig:
        e = self.engine
        return EngineConfig(
            model=self.model,
            mode=self.mode,
            stride=self.stride,
            adapter=self.adapter,
            mask_token_id=self.mask_token_id,
            dtype=self.dtype,
            device=self.device,
            kv_block_size=e.kv_block_size,
            kv_cache_tokens=e.kv_cache_tokens,
            max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens,
            max_model_len=e.max_model_len,
            seed=self.seed,
        )
