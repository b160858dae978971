"""`idlm-serve run CONFIG`: Ray's `serve run CONFIG`, with a graceful stop on SIGTERM and SIGINT.

    idlm-serve run deploy/idlm.yaml                         # (python -m cluster.serve_run run ...)
    idlm-serve run deploy/idlm.yaml --address 127.0.0.1:6379 --drain-timeout 120

Owns: the launcher and its stop sequence. It starts Serve and deploys the config file exactly as
`serve run` does (the same YAML, the same Ray calls), then blocks. On SIGTERM (`docker stop`,
`kill`, a Kubernetes pod deletion) or Ctrl-C it drains before it stops:

1. every application is deleted (`serve.delete`, not blocking): the proxy stops routing new
   requests to it (they get 404), while Serve stops its deployments in dependency order, callers
   first, each replica waiting for its in-flight requests, streams included, up to the
   deployment's `graceful_shutdown_timeout_s` (cluster.config: `replica.` / `ingress.`);
2. once no application is left, or `--drain-timeout` has passed, Serve shuts down and the
   process exits (0 after a full drain, 1 after a timeout).

Why not plain `serve run`: on SIGTERM it exits at once through `ray.init`'s handler
(`sys.exit`), which tears down the Ray cluster it started, in-flight streams with it (or, attached
to a running cluster, leaves the applications running). On Ctrl-C it calls `serve.shutdown()`,
whose first step kills the HTTP proxies, so in-flight streams are cut there too.
docs/reliability.md has the measurements.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

import yaml

log = logging.getLogger("idlm.serve_run")


def _apps_left(names: list[str]) -> list[str]:
    from ray import serve

    apps = serve.status().applications
    return [n for n in names if n in apps and apps[n].status != "NOT_STARTED"]


def drain(names: list[str], timeout_s: float) -> bool:
    """Deletes the applications and waits until Serve has stopped them (their replicas drained
    first); True when all were gone within `timeout_s`."""
    from ray import serve

    for n in names:
        serve.delete(n, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = _apps_left(names)
        if not left:
            return True
        time.sleep(0.5)
    log.warning("applications %s still draining after %.0f s; shutting down anyway", _apps_left(names), timeout_s)
    return False


def run(config_path: str, address: str | None, drain_timeout_s: float) -> int:
    import ray
    from ray.serve._private import api as serve_api  # what `serve run` itself calls
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    with open(config_path) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    names = [app.name for app in config.applications]
    ray.init(address=address, namespace="serve")
    # ray.init installs a SIGTERM handler that calls sys.exit; ours replaces it (main thread).
    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum, frame):
        got.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)
    log.warning("submitted %s; SIGTERM or Ctrl-C drains in-flight requests, then stops Serve", names)
    while not stop.wait(1.0):
        pass
    from ray import serve

    t0 = time.monotonic()
    log.warning("signal %s: draining %s (at most %.0f s)", got[0], names, drain_timeout_s)
    drained = drain(names, drain_timeout_s)
    log.warning("drained in %.1f s; shutting Serve down", time.monotonic() - t0)
    serve.shutdown()
    ray.shutdown()
    return 0 if drained else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="idlm-serve", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="serve a Serve config file; SIGTERM / Ctrl-C drain it, then stop")
    r.add_argument("config", help="Serve config YAML (deploy/idlm.yaml)")
    r.add_argument("--address", "-a", default=None,
                   help="Ray cluster to attach to (as `serve run --address`); default: RAY_ADDRESS, else a new local one")
    r.add_argument("--drain-timeout", type=float, default=180.0,
                   help="most seconds to wait for in-flight requests after a signal (> the deployments' "
                        "graceful_shutdown_timeout_s, once per dependency tier)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(a.config, a.address, a.drain_timeout)


if __name__ == "__main__":
    sys.exit(main())
