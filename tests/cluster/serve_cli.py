"""Ray Serve's CLI driven as a user drives it, for the rolling-update and graceful-shutdown tests.

Owns: the Serve config file of a tiny ISD app (`write_config`, the layout of deploy/idlm.yaml on a
free port of 127.0.0.1), `serve_cli` (the real `serve` executable beside this interpreter),
`app_details` / `wait_deployed` (Serve's REST API on the head's dashboard: what `serve status`
prints) and `Load`: C clients in a thread of their own, each sending requests back to back over
real HTTP (bench/soak_load.py's client and classes: chat and completions, streamed and not, T=0
and T=0.8, `ignore_eos` so every answer must be exactly `max_tokens` long) until stopped.

    cfg = write_config(tmp / "v1.yaml", "roll", args, http_port)
    serve_cli("deploy", str(cfg), "-a", head.dashboard_address)
    wait_deployed(head.dashboard_address, "roll", replicas=1, max_ongoing=8)
    load = Load(base, "tiny", concurrency=12).start(); ...; outs = load.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import requests
import yaml

from bench.soak_load import QUESTIONS, Outcome, Spec, send
from tests.cluster.multinode import ENV, RayNode
from tests.cluster.support import wait_for

SERVE = str(Path(sys.executable).with_name("serve"))
ENGINE = "EngineReplica"


@contextlib.contextmanager
def head_node(monkeypatch, prefix: str, num_cpus: int):
    """A head node (`ray start --head`, dashboard on 127.0.0.1) in a temp dir of its own, with the
    test clusters' RAY_* environment; stopped, with everything on it, at exit."""
    for k, v in ENV.items():
        if k.startswith("RAY_"):
            monkeypatch.setenv(k, v)
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    node = RayNode(tmp, num_cpus=num_cpus, dashboard=True).start()
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_args(model_dir: str, replicas: int, max_ongoing: int, **overrides) -> dict:
    """A tiny ISD app (N=4) with Serve's power-of-two router (the load's prompts share a template
    prefix that the prefix router would rightly keep on one replica; these tests are about
    replicas coming and going)."""
    return {"model": model_dir, "served_model_name": "tiny", "mode": "isd", "stride": 4, "max_model_len": 2048,
            "kv_cache_tokens": 16384, "max_num_seqs": 32, "router": {"policy": "pow2"},
            "replica": {"num_replicas": replicas, "max_ongoing_requests": max_ongoing, "max_queued_requests": 256,
                        "health_check_period_s": 2, "ray_actor_options": {"num_cpus": 1}},
            **overrides}


def write_config(path: Path, app: str, args: dict, http_port: int, deployments: list[dict] | None = None) -> Path:
    """A Serve config file as deploy/idlm.yaml lays it out (one app, `cluster.app:build_app`);
    `deployments`: Serve's per-deployment overrides (e.g. `[{name: EngineReplica, num_replicas: 3}]`)."""
    entry = {"name": app, "route_prefix": "/", "import_path": "cluster.app:build_app", "args": args}
    if deployments:
        entry["deployments"] = deployments
    path.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [entry],
    }, sort_keys=False))
    return path


def serve_cli(*argv: str, timeout: float = 120) -> str:
    """Runs `serve <argv>`; its output, or AssertionError with it when the command fails."""
    p = subprocess.run([SERVE, *argv], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert p.returncode == 0, f"serve {' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


def dashboard_up(dashboard: str) -> bool:
    try:
        return requests.get(f"{dashboard}/api/serve/applications/", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def app_details(dashboard: str, app: str) -> dict | None:
    """The app's entry in Serve's REST API (`GET /api/serve/applications/`), None before it exists."""
    try:
        r = requests.get(f"{dashboard}/api/serve/applications/", timeout=10)
    except requests.RequestException:
        return None
    return r.json().get("applications", {}).get(app) if r.status_code == 200 else None


def engine_replicas(details: dict | None) -> dict[str, str]:
    """replica id -> state of the engine deployment."""
    if not details or ENGINE not in details.get("deployments", {}):
        return {}
    return {r["replica_id"]: r["state"] for r in details["deployments"][ENGINE].get("replicas", [])}


def deployed(details: dict | None, replicas: int, max_ongoing: int) -> bool:
    """The app RUNNING with exactly `replicas` engine replicas, all RUNNING, under the config asked."""
    if not details or details.get("status") != "RUNNING":
        return False
    dep = details["deployments"][ENGINE]
    states = list(engine_replicas(details).values())
    return (dep["status"] == "HEALTHY" and states == ["RUNNING"] * replicas
            and dep["deployment_config"]["max_ongoing_requests"] == max_ongoing
            and all(d["status"] == "HEALTHY" and all(r["state"] == "RUNNING" for r in d.get("replicas", []))
                    for d in details["deployments"].values()))


def wait_deployed(dashboard: str, app: str, replicas: int, max_ongoing: int, timeout: float = 300,
                  seen: dict | None = None) -> dict:
    """Polls until `deployed`; `seen[replica id][state]` gets the first time (monotonic) each
    engine replica was seen in each state (e.g. when an old one began STOPPING)."""
    seen = {} if seen is None else seen

    def check():
        d = app_details(dashboard, app)
        for rid, state in engine_replicas(d).items():
            seen.setdefault(rid, {}).setdefault(state, time.monotonic())
        return d if deployed(d, replicas, max_ongoing) else None
    details = wait_for(check, timeout=timeout, interval=0.25)
    assert details, app_details(dashboard, app)
    return details


def spec(i: int, max_tokens: int, stream: bool | None = None) -> Spec:
    """Request i of the load: chat or completions, streamed or not, greedy or T=0.8 seeded."""
    return Spec(i, "chat" if i % 2 else "completions", QUESTIONS[i % len(QUESTIONS)], max_tokens,
                stream if stream is not None else i % 4 < 2, 0.0 if i % 3 else 0.8, None if i % 3 else i,
                None, ignore_eos=True)


class Load:
    """`concurrency` clients sending requests back to back (bounded by `max_requests` and each
    request's `timeout_s`) until `stop()`; `submit` adds single requests (long streams). Every
    outcome carries its start and end (monotonic seconds)."""

    def __init__(self, base: str, model: str, concurrency: int, lengths=(8, 24, 48), max_requests: int = 5000,
                 timeout_s: float = 180) -> None:
        self.base, self.model, self.concurrency, self.lengths = base, model, concurrency, lengths
        self.max_requests, self.timeout_s = max_requests, timeout_s
        self.outcomes: list[tuple[Spec, Outcome, float, float]] = []
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Future] = []

    async def _one(self, s: Spec) -> None:
        t0 = time.monotonic()
        out = await send(self._client, self.base, self.model, s)
        self.outcomes.append((s, out, t0, time.monotonic()))

    async def _client_loop(self) -> None:
        while not self._stop.is_set():
            i = next(self._ids)
            if i >= self.max_requests:
                return
            await self._one(spec(i, self.lengths[i % len(self.lengths)]))

    def start(self) -> Load:
        self._thread.start()

        async def make():
            limits = httpx.Limits(max_connections=self.concurrency + 16, max_keepalive_connections=self.concurrency)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits)
        asyncio.run_coroutine_threadsafe(make(), self._loop).result(10)
        self._tasks = [asyncio.run_coroutine_threadsafe(self._client_loop(), self._loop) for _ in range(self.concurrency)]
        return self

    def submit(self, s: Spec) -> None:
        self._tasks.append(asyncio.run_coroutine_threadsafe(self._one(s), self._loop))

    def stop(self, timeout: float = 300) -> list[tuple[Spec, Outcome, float, float]]:
        """Stops issuing requests, waits for those in flight (each bounded by `timeout_s`)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._tasks:
            t.result(max(1.0, deadline - time.monotonic()))
        asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        return self.outcomes
