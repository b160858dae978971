"""The Ray Serve request router of the engine replicas: a thin adapter of `cluster.router_policy`
to Ray Serve's `RequestRouter` API (alpha since Ray 2.49; checked against 2.60's source).

Owns: `IdlmPrefixRouter` (`AppConfig.router.policy: prefix`; `pow2` keeps Serve's default
router) and its decision counter `idlm_router_decisions_total{outcome}`.

How Serve drives it (ray/serve/_private/request_router/request_router.py): one router per
deployment handle, in the *caller's* process (the ingress), on its own event loop, so nothing here
blocks (no actor calls: the index is local). `choose_replicas` returns ranked groups and Serve
sends to the least-queued replica of the first group with room under `max_ongoing_requests`, so
`[[best], [second], [rest]]` spills over by itself. Traps handled here:
- `routing_context.should_backoff` must be set when the full set is returned (no mixin sets it
  for us), or a saturated deployment is retried in a tight loop.
- FIFOMixin hands a pick to the oldest pending request, which would break affinity: not used.
  Without it the base class matches a pick to its request by `internal_request_id`, which the
  fan-out calls of one HTTP request would share: the ingress gives each its own
  (cluster.openai.generation._submit).
- Arguments are resolved before routing: `pending_request.args[0]` is our `GenerateRequest` dict
  with its `prefix_hashes`; other calls (`stats`, `reset_prefix_cache`) carry none and fall back to
  power-of-two.
- The class is cloudpickled *by value* with its module (RequestRouterConfig), so the module keeps
  no state of its own: counters are created in `initialize_state`, inside the ingress process.
Replica load comes from Serve's queue-length cache (this router's own count of ongoing requests,
refreshed by the replicas' rejection-protocol replies) and from each replica's
`record_routing_stats` (KV usage, running / waiting, KV size), broadcast every few seconds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.config import RouterOptions
from cluster.router_policy import Decision, PrefixPolicy, ReplicaLoad

log = logging.getLogger("ray.serve")
_MAX_TRACKED = 10_000  # decisions awaiting on_request_routed (a cancelled request never gets one)


def _hashes(pending_request: PendingRequest | None) -> list[bytes]:
    if pending_request is None or not pending_request.args:
        return []
    arg = pending_request.args[0]
    return list(arg.get("prefix_hashes") or []) if isinstance(arg, dict) else []


class IdlmPrefixRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        from ray.util import metrics

        from cluster.metric_names import COUNTERS, LABELS

        self.policy = PrefixPolicy(RouterOptions.from_router_kwargs(kwargs))
        self.tags = {"model": str(kwargs.get("model", "")), "mode": str(kwargs.get("mode", "")),
                     "stride": str(kwargs.get("stride", ""))}
        self.decisions = metrics.Counter("idlm_router_decisions", COUNTERS["idlm_router_decisions"],
                                         tag_keys=LABELS + ("outcome",))
        self._pending: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    def _load(self, r: RunningReplica) -> ReplicaLoad:
        st = r.routing_stats or {}
        queue = self.replica_queue_len_cache.get(r.replica_id)
        if queue is None:
            queue = int(st.get("num_running", 0)) + int(st.get("num_waiting", 0))
        return ReplicaLoad(r.replica_id.unique_id, queue, float(st.get("kv_usage", 0.0)), st.get("num_blocks"))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # we always rank the full set
        if not candidate_replicas:
            return []
        loads = [self._load(r) for r in candidate_replicas]
        try:
            decision = self.policy.choose(_hashes(pending_request), loads)
        except Exception:  # a routing bug must never fail a request
            log.exception("prefix router: choice failed, falling back to power of two")
            decision = self.policy.pow2(loads)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[i] for i in decision.ranked]
        if pending_request is not None and pending_request.metadata.call_method == "generate":
            self._remember(pending_request.metadata.internal_request_id, decision)
        if decision.outcome == "fallback":
            return [ranked[:2], ranked[2:]] if len(ranked) > 2 else [ranked]
        return [g for g in ([ranked[0]], ranked[1:2], ranked[2:]) if g]

    def _remember(self, internal_id: str, decision: Decision) -> None:
        self._pending[internal_id] = (decision.outcome, decision.ranked[0] if decision.ranked else None)
        self._pending.move_to_end(internal_id)
        while len(self._pending) > _MAX_TRACKED:
            self._pending.popitem(last=False)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        if pending_request.metadata.call_method != "generate":
            return  # stats / control calls: not traffic
        rid = replica_id.unique_id
        self.policy.record(rid, _hashes(pending_request))
        outcome, first = self._pending.pop(pending_request.metadata.internal_request_id, ("fallback", None))
        if first is not None and first != rid and outcome != "fallback":
            outcome = "spill"
        self.decisions.inc(1, tags={**self.tags, "replica": rid, "outcome": outcome})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.policy.retain(r.replica_id.unique_id for r in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.drop(replica_id.unique_id)

    # for tests and debugging: what this router believes each replica holds
    def index_sizes(self) -> dict[str, int]:
        return {rid: len(idx) for rid, idx in self.policy.index.items()}
