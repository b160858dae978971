"""Builder of the Serve application: the `import_path` target of `deploy/*.yaml`.

    applications:
    - name: idlm
      route_prefix: /
      import_path: cluster.app:build_app
      args: {model: smollm2, mode: isd, stride: 4, replica: {num_replicas: 2}}

Owns: `build_app(args)`, which validates `args` with `AppConfig` (a bad field fails here, at
start, with the field's name), gives the replica deployment its request router (`router.policy`)
and binds the ingress to it.
"""

from __future__ import annotations

from pydantic import ValidationError
from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.config import AppConfig
from cluster.ingress import OpenAIIngress
from cluster.replica import EngineReplica


def build_app(args: dict | None = None) -> serve.Application:
    try:
        cfg = AppConfig.model_validate(args or {})
    except ValidationError as e:
        raise ValueError(f"invalid idlm-serve app config (deploy args):\n{e}") from None
    raw = cfg.model_dump(mode="json")
    opts = cfg.replica.deployment_options()
    router = cfg.router.request_router_config({"model": cfg.model_name, "mode": cfg.mode, "stride": cfg.to_engine_config().stride})
    if router is not None:
        opts["request_router_config"] = RequestRouterConfig(**router)
    replica = EngineReplica.options(name="EngineReplica", **opts).bind(raw)
    ingress = OpenAIIngress.options(name="OpenAIIngress", **cfg.ingress.deployment_options(cfg.replica.graceful_shutdown_timeout_s))
    return ingress.bind(raw, replica)
