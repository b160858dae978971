"""Builder of the Serve application: the `import_path` target of `deploy/*.yaml`.

    applications:
    - name: idlm
      route_prefix: /
      import_path: cluster.app:build_app
      args: {model: smollm2, mode: risd, stride: 4, replica: {num_replicas: 2}}

Owns: `build_app(args)`, which validates `args` with `AppConfig` (a bad field fails here, at
start, with the field's name) and binds the ingress to the replica deployment.
"""

from __future__ import annotations

from ray import serve

from cluster.config import AppConfig
from cluster.ingress import OpenAIIngress
from cluster.replica import EngineReplica


def build_app(args: dict | None = None) -> serve.Application:
    cfg = AppConfig.model_validate(args or {})
    raw = cfg.model_dump(mode="json")
    replica = EngineReplica.options(name="EngineReplica", **cfg.replica.deployment_options()).bind(raw)
    ing = cfg.ingress
    ingress = OpenAIIngress.options(
        name="OpenAIIngress",
        num_replicas=ing.num_replicas,
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
        ray_actor_options={"num_cpus": ing.num_cpus},
    )
    return ingress.bind(raw, replica)
