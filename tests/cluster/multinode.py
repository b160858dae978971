"""Several Ray nodes on one machine, each a separate raylet started with the real CLI
(`ray start --head` / `ray start --address=...`), bound to 127.0.0.1 with ports of its own.

Owns: `RayNode`. Each node runs as `ray start --block` in a subprocess this object owns, so
stopping that process (SIGTERM, by its PID) stops exactly that node's raylet and workers (a node
failure), and never touches any other Ray cluster on the machine (`ray stop` would).

    head = RayNode(tmp, num_cpus=3, resources={"idlm_slot": 1}).start()
    worker = RayNode(tmp, address=head.address, num_cpus=3, resources={"idlm_slot": 1}).start()
    ray.init(address=head.address)
    worker.node_id()  # its id in ray.nodes()
    ...; worker.stop(); worker = worker.restart(); ...; ray.shutdown(); worker.stop(); head.stop()
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster.support import free_port

# The token that Ray's CLI would otherwise create is a per-user file shared with any other Ray
# cluster on the machine; these local test clusters listen on 127.0.0.1 only.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class RayNode:
    def __init__(self, temp_dir: str, address: str | None = None, num_cpus: int = 2,
                 resources: dict | None = None, dashboard: bool = False) -> None:
        self.temp_dir, self.head_address = temp_dir, address
        self.num_cpus, self.resources = num_cpus, resources or {}
        self.port = free_port() if address is None else None
        # The dashboard (head only) serves Serve's REST API, which `serve deploy` / `serve status` use.
        self.dashboard_port = free_port() if dashboard and address is None else None
        self.proc: subprocess.Popen | None = None
        self.log = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}" if self.port else self.head_address

    @property
    def dashboard_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _cmd(self) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
               f"--resources={json.dumps(self.resources)}", f"--temp-dir={self.temp_dir}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               "--disable-usage-stats"]
        if self.head_address is None:
            dash = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
                    if self.dashboard_port else ["--include-dashboard=false"])
            return [*cmd, "--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}", *dash]
        return [*cmd, f"--address={self.head_address}"]

    def start(self, timeout: float = 120.0) -> RayNode:
        role = "head" if self.head_address is None else "worker"
        log_path = os.path.join(self.temp_dir, f"ray-start-{role}-{time.time_ns()}.log")
        self.log = open(log_path, "w")
        cmd = self._cmd()
        self.node_manager_port = int(next(c for c in cmd if c.startswith("--node-manager-port=")).split("=")[1])
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start ({role}) exited with {self.proc.returncode}; see {log_path}")
            with open(log_path, errors="replace") as f:
                if "Ray runtime started" in f.read():
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ray start ({role}) did not start in {timeout} s; see {log_path}")

    def node_id(self) -> str | None:
        """This node's id in `ray.nodes()` (of a connected driver), matched by its raylet port."""
        import ray

        for n in ray.nodes():
            if n["Alive"] and n["NodeManagerPort"] == self.node_manager_port:
                return n["NodeID"]
        return None

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops its own node's processes on SIGTERM
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self.log:
            self.log.close()
            self.log = None

    def restart(self) -> RayNode:
        """A fresh node with the same role, resources and CPUs (a node coming back)."""
        return RayNode(self.temp_dir, self.head_address, self.num_cpus, self.resources).start()
