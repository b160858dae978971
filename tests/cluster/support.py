"""Fixtures for cluster tests: a real local Ray cluster with Serve bound to 127.0.0.1, and a
Prometheus-text scraper for Ray's metrics endpoint. Everything started here is stopped here."""

from __future__ import annotations

import re
import socket
import time
from collections import defaultdict

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServe:
    def __init__(self) -> None:
        self.http_port = free_port()
        self.metrics_port = free_port()

    def start(self) -> RayServe:
        import ray
        from ray import serve

        ray.init(num_cpus=8, include_dashboard=False, _metrics_export_port=self.metrics_port,
                 log_to_driver=False, _node_ip_address="127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})
        return self

    def deploy(self, args: dict, name: str, route_prefix: str) -> str:
        from ray import serve

        from cluster.app import build_app

        serve.run(build_app(args), name=name, route_prefix=route_prefix)
        return f"http://127.0.0.1:{self.http_port}{route_prefix.rstrip('/')}"

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    # -- metrics ---------------------------------------------------------------------------
    def scrape(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+([-+0-9.eEinfNa]+)")


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out[m.group(1)].append((labels, float(m.group(4))))
    return out


def metric_sum(metrics: dict, name: str, app_model: str | None = None, **match) -> float:
    total = 0.0
    for labels, v in metrics.get(name, []):
        if app_model is not None and labels.get("model") != app_model:
            continue
        if all(labels.get(k) == str(val) for k, val in match.items()):
            total += v
    return total


def wait_for(pred, timeout: float = 60.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    return last
