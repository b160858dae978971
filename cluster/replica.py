"""The replica deployment: owns one `AsyncEngine` (its step loop runs in a background thread) and
streams deltas back to the ingress through a streaming deployment handle.

Owns: `EngineReplica` (generate stream, stats, routing stats for cluster.router, prefix-cache
reset, health check) and the periodic metrics export.
Cancellation of the handle call (client disconnect) closes the engine's async iterator, which
aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import psutil
from ray import serve

from cluster.config import AppConfig
from cluster.metrics import EngineMetricsExporter
from cluster.protocol import Delta, GenerateRequest
from workers.async_engine import AsyncEngine
from workers.sampling_params import SamplingParams

log = logging.getLogger("ray.serve")


@serve.deployment
class EngineReplica:
    def __init__(self, config: dict) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.engine = AsyncEngine(self.cfg.to_engine_config())
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (direct construction)
            self.replica_id = "local"
        try:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray
            self.node_id = "local"
        self.exporter = EngineMetricsExporter(self.cfg.model_name, self.cfg.mode, self.engine.config.stride, self.replica_id)
        self._export_task: asyncio.Task | None = None

    def _ensure_exporter(self) -> None:
        if self._export_task is None:
            self._export_task = asyncio.get_running_loop().create_task(self._export_loop())

    async def _export_loop(self) -> None:
        while True:
            self.export_now()
            await asyncio.sleep(0.5)

    def export_now(self) -> None:
        self.exporter.update(self.engine.stats(), self.engine.drain_observations())

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Delta]:
        self._ensure_exporter()
        params = SamplingParams(**req["params"])
        async for out in self.engine.generate(req["prompt_token_ids"], params, req["request_id"], req.get("cache_salt")):
            yield Delta(
                request_id=out.request_id,
                token_ids=out.new_token_ids,
                text=out.new_text,
                finished=out.finished,
                finish_reason=out.finish_reason,
                num_prompt_tokens=out.num_prompt_tokens,
                num_output_tokens=out.num_output_tokens,
                num_cached_tokens=out.num_cached_tokens,
                replica=self.replica_id,
                metrics=out.metrics.to_dict() if out.metrics else None,
                logprobs=None if out.logprobs is None else [list(e) for e in out.logprobs],
                prompt_logprobs=None if out.prompt_logprobs is None else
                [None if e is None else list(e) for e in out.prompt_logprobs],
            )

    async def stats(self) -> dict:
        self._ensure_exporter()
        self.export_now()
        st = self.engine.stats()
        return {
            "replica": self.replica_id,
            "generation_tokens": st.generation_tokens,
            "decode_forwards": st.decode_forwards,
            "draft_tokens": st.draft_tokens,
            "accepted_tokens": st.accepted_tokens,
            "tokens_per_forward": st.tokens_per_forward,
            "acceptance_rate": st.acceptance_rate,
            "num_running": st.num_running,
            "num_waiting": st.num_waiting,
            "kv_cache_usage": st.kv_cache_usage,
            "requests": dict(st.requests),
            "prefix_cache_queries": st.prefix_cache_queries,
            "prefix_cache_hits": st.prefix_cache_hits,
            "prefix_cache_preempted_queries": st.prefix_cache_preempted_queries,
            "prefix_cache_preempted_hits": st.prefix_cache_preempted_hits,
            "prefix_cache_evictions": st.prefix_cache_evictions,
            "kv_cache_cached_blocks": st.kv_cache_cached_blocks,
            "num_blocks": self.engine.config.num_blocks,
            "rss_bytes": psutil.Process().memory_info().rss,
            "node_id": self.node_id,
        }

    def record_routing_stats(self) -> dict:
        """Pulled by the Serve controller every `router.stats_period_s` and broadcast to every
        handle's router (cluster.router) as `replica.routing_stats`. Small and flat: each change
        re-broadcasts the replica set."""
        st = self.engine.stats()
        return {
            "kv_usage": round(st.kv_cache_usage, 3),
            "num_running": st.num_running,
            "num_waiting": st.num_waiting,
            "queued_prefill_tokens": st.queued_prefill_tokens,
            "num_blocks": self.engine.config.num_blocks,
            "block_size": self.engine.config.kv_block_size,
        }

    async def reset_prefix_cache(self) -> int:
        """Forgets this replica's cached prefixes (benchmarks, new weights); returns how many blocks."""
        return self.engine.reset_prefix_cache()

    async def check_health(self) -> None:
        """Called periodically by the Serve controller: raising marks the replica unhealthy and
        Serve replaces it. Healthy means the engine's step thread is alive and has not failed."""
        self._ensure_exporter()
        if not self.engine.is_healthy():
            self.engine.check_health()  # raises EngineDeadError with the step loop's failure

    def __del__(self) -> None:
        try:
            self.engine.shutdown(timeout=1.0)
        except Exception:
            pass
