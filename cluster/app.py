"""Builder of the Serve application: the `import_path` target of `deploy/*.yaml`.

    applications:
    - name: idlm
      route_prefix: /
      import_path: cluster.app:build_app
      args: {model: smollm2, mode: isd, stride: 4, replica: {num_replicas: 2}}

Owns: `build_app(args)`, which validates `args` with `AppConfig` (a bad field fails here, at
start, with the field's name) and binds the ingress to the replica deployment.
"""

from __future__ import annotations

from pydantic import ValidationError
from ray import serve

from cluster.config import AppConfig
from cluster.ingress import OpenAIIngress
from cluster.replica import EngineReplica


def build_app(args: dict | None = None) -> serve.Application:
    try:
        cfg = AppConfig.model_validate(args or {})
    except ValidationError as e:
        raise ValueError(f"invalid idlm-serve app config (deploy args):\n{e}") from None
    raw = cfg.model_dump(mode="json")
    replica = EngineReplica.options(name="EngineReplica", **cfg.replica.deployment_options()).bind(raw)
    ingress = OpenAIIngress.options(name="OpenAIIngress", **cfg.ingress.deployment_options())
    return ingress.bind(raw, replica)
