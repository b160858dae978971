"""Reusable fixtures for cluster tests (and the dashboards' tests): a real local Ray cluster with
Serve bound to 127.0.0.1 and a known metrics port (`RayServe`), a Prometheus-text parser for Ray's
metrics endpoint, and a real Prometheus server scraping it (`PrometheusServer`, Debian package
`prometheus`). Everything started here is stopped here, by PID / by the handle that started it.

    rs = RayServe(num_cpus=8).start()          # ray.init(address="local") + serve.start on 127.0.0.1
    base = rs.deploy(ARGS, "idlm", "/")        # -> "http://127.0.0.1:<port>"
    prom = PrometheusServer([rs.metrics_target]).start()
    prom.query('sum(rate(ray_idlm_generation_tokens_total[1m]))')
    prom.stop(); rs.stop()

`MODEL` / `SHARED_ARGS` are the app that tests/cluster/conftest.py serves to every e2e test of this
package (one Ray cluster for all of them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections import defaultdict

import requests

MODEL = "smollm2"
SHARED_ARGS = {
    "model": MODEL,
    "mode": "risd",  # base SmolLM2 + the demo gated-LoRA adapter (workers/adapters/smollm2-risd)
    "stride": 4,
    "max_num_seqs": 32, "max_num_batched_tokens": 1024, "kv_cache_tokens": 8192, "max_model_len": 2048,
    "replica": {"num_replicas": 2, "max_ongoing_requests": 64, "max_queued_requests": 128,
                "ray_actor_options": {"num_cpus": 1}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServe:
    def __init__(self, num_cpus: int = 8) -> None:
        self.num_cpus = num_cpus
        self.http_port = free_port()
        self.metrics_port = free_port()

    @property
    def metrics_target(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def start(self) -> RayServe:
        import ray
        from ray import serve

        # address="local": always a fresh cluster owned by this process, never someone else's.
        ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False,
                 _metrics_export_port=self.metrics_port, log_to_driver=False, _node_ip_address="127.0.0.1")
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


def replica_stats(app_name: str, replicas: int = 2, tries: int = 60) -> dict[str, dict]:
    """`EngineReplica.stats()` of each replica of an app, by replica id (calls until all answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("EngineReplica", app_name=app_name)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        st = handle.stats.remote().result()
        seen[st["replica"]] = st
        if len(seen) == replicas:
            break
    return seen


def wait_for(pred, timeout: float = 60.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    return last


class PrometheusServer:
    """A real Prometheus (Debian package `prometheus`) on 127.0.0.1 scraping `targets` every
    `interval_s`, storing into a temp dir. `apt-get install -y prometheus` if the binary is missing."""

    def __init__(self, targets: list[str], interval_s: float = 1.0) -> None:
        self.targets, self.interval_s = targets, interval_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None

    @staticmethod
    def binary() -> str:
        exe = shutil.which("prometheus")
        if exe is None:
            subprocess.run(["apt-get", "install", "-y", "prometheus"], check=True, capture_output=True, timeout=600)
            exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus binary not found after apt-get install -y prometheus")
        return exe

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        exe = self.binary()
        self.dir = tempfile.mkdtemp(prefix="idlm-prom-")
        cfg = os.path.join(self.dir, "prometheus.yml")
        every = f"{max(int(self.interval_s * 1000), 1)}ms"  # Prometheus durations take no fractions ("1.0s")
        with open(cfg, "w") as f:
            f.write(
                f"global:\n  scrape_interval: {every}\n  evaluation_interval: {every}\n"
                "scrape_configs:\n  - job_name: ray\n    static_configs:\n"
                f"      - targets: {json.dumps(self.targets)}\n"
            )
        self.log = open(os.path.join(self.dir, "prometheus.log"), "w")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={cfg}", f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        ready = wait_for(lambda: self._ready(), timeout=timeout)
        if not ready:
            self.stop()
            raise RuntimeError("prometheus did not become ready")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def query(self, promql: str) -> list[dict]:
        r = requests.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        res = self.query(promql)
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # by the PID we started
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
