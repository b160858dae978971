"""Rolling update under load (`pytest -m slow -s`): `serve deploy` of a changed config, the way a
user updates a running app, while 12 clients keep sending requests over real HTTP.

A head node started with the real CLI (`ray start --head`, dashboard on 127.0.0.1: Serve's REST
API, which `serve deploy` / `serve status` talk to) serves a tiny ISD model. Two updates, each
with long streams open on the replicas being replaced:

1. a changed engine argument (`max_num_seqs`), 1 -> 2 engine replicas and `max_ongoing_requests`
   8 -> 16: new `args`, so Serve replaces every replica of both deployments (engine and ingress)
   by a rolling update;
2. back to 1 replica with `max_ongoing_requests` 12, given in the config's `deployments:` section
   (Serve's per-deployment overrides; the args unchanged): a lightweight update, no restart, and
   Serve stops one replica with its streams open (a scale-down). (Any change of `args`, even of
   `replica.num_replicas`, is a new code version to Serve: every replica restarts.)

No accepted request is dropped: every one ends with 200, `finish_reason` `length` and exactly
`max_tokens` tokens (`ignore_eos`), streams with `[DONE]` after their usage chunk. Streams that
ran on a replaced replica for longer than the 5 s graceful timeout the replicas had before
(cluster.config: now 60 s) completed: the regression check of that default. After each update
`serve status` reports the new config. Prints the figures of README "Reliability".
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.cluster.multinode import RayNode
from tests.cluster.serve_cli import (
    Load,
    dashboard_up,
    engine_replicas,
    head_node,
    serve_cli,
    spec,
    tiny_args,
    wait_deployed,
    write_config,
)
from tests.cluster.support import free_port, wait_for

pytestmark = pytest.mark.slow
APP = "roll"
OLD_GRACEFUL_TIMEOUT_S = 5.0  # ReplicaOptions.graceful_shutdown_timeout_s before this test existed
LONG_S = 25.0  # how long the long streams run under the load


@pytest.fixture
def head(monkeypatch):
    with head_node(monkeypatch, "idlmru-", num_cpus=6) as node:
        yield node


def _deploy(head: RayNode, path: Path, args: dict, port: int, deployments: list[dict] | None = None) -> float:
    write_config(path, APP, args, port, deployments)
    t = time.monotonic()
    serve_cli("deploy", str(path), "-a", head.dashboard_address)
    return t


def _long_streams(load: Load, n: int, max_tokens: int, first: int) -> list[int]:
    ids = list(range(first, first + n))
    for i in ids:
        load.submit(spec(i, max_tokens, stream=True))
    return ids


def test_serve_deploy_under_load_drops_nothing(head, tmp_path):
    from tests.models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "tiny", "sdar", max_position_embeddings=2048)
    port, dash = free_port(), head.dashboard_address
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: dashboard_up(dash), timeout=60)
    seen: dict[str, dict[str, float]] = {}
    _deploy(head, tmp_path / "v1.yaml", tiny_args(model, 1, 8), port)
    v1 = engine_replicas(wait_deployed(dash, APP, replicas=1, max_ongoing=8, seen=seen))

    # calibrate the long streams to ~LONG_S under the load (the tiny model's speed varies by machine)
    load = Load(base, "tiny", concurrency=12).start()
    time.sleep(3)
    t0 = time.monotonic()
    load.submit(spec(10_000, 64, stream=True))
    assert wait_for(lambda: any(s.i == 10_000 for s, *_ in load.outcomes), timeout=120, interval=0.1)
    long_tokens = max(64, min(1800, int(LONG_S / ((time.monotonic() - t0) / 64))))

    # update 1: new args (every replica of both deployments replaced), 1 -> 2 replicas, 8 -> 16
    long1 = _long_streams(load, 4, long_tokens, 20_000)
    time.sleep(2)
    t_u1 = _deploy(head, tmp_path / "v2.yaml", tiny_args(model, 2, 16, max_num_seqs=24), port)
    v2 = engine_replicas(wait_deployed(dash, APP, replicas=2, max_ongoing=16, seen=seen))
    u1_s = time.monotonic() - t_u1
    assert not set(v1) & set(v2), (v1, v2)  # replaced, not kept
    time.sleep(3)

    # update 2, through Serve's per-deployment overrides (the app's args unchanged, so no restart):
    # scale down to 1 (one replica stopped with streams open), max_ongoing 16 -> 12
    long2 = _long_streams(load, 4, long_tokens, 30_000)
    time.sleep(2)
    t_u2 = _deploy(head, tmp_path / "v3.yaml", tiny_args(model, 2, 16, max_num_seqs=24), port,
                   [{"name": "EngineReplica", "num_replicas": 1, "max_ongoing_requests": 12}])
    v3 = engine_replicas(wait_deployed(dash, APP, replicas=1, max_ongoing=12, seen=seen))
    u2_s = time.monotonic() - t_u2
    assert set(v3) < set(v2), (v2, v3)
    time.sleep(3)
    outs = load.stop()

    (cfg,) = [d for d in yaml.safe_load_all(serve_cli("config", "-a", dash)) if d and d.get("name") == APP]
    assert cfg["args"]["max_num_seqs"] == 24
    assert cfg["deployments"] == [{"name": "EngineReplica", "num_replicas": 1, "max_ongoing_requests": 12}]

    by = Counter(o.cls for _, o, _, _ in outs)
    bad = [(s.i, o.cls, o.status, o.why) for s, o, _, _ in outs if o.cls != "ok"]
    assert not bad, (by, bad[:10])
    during = sum(1 for _, _, t0, t1 in outs if any(t1 >= t and t0 <= t + d for t, d in ((t_u1, u1_s), (t_u2, u2_s))))
    # Streams whose replica was stopped (replaced in update 1, scaled away in update 2) and that
    # ran on for longer than the old graceful timeout after Serve began stopping it: completed.
    stopping = {rid: st["STOPPING"] for rid, st in seen.items() if "STOPPING" in st}
    assert set(v1) <= set(stopping) and len(set(v2) - set(v3)) == 1 and set(v2) - set(v3) <= set(stopping), seen
    longs = {s.i: (o, t1 - t0, t1) for s, o, t0, t1 in outs if s.i in long1 + long2}
    assert len(longs) == 8
    outlived = {i: round(t1 - stopping[o.replica], 1) for i, (o, _, t1) in longs.items()
                if o.replica in stopping and t1 - stopping[o.replica] > OLD_GRACEFUL_TIMEOUT_S}
    assert outlived, {i: (o.replica, round(d, 1)) for i, (o, d, _) in longs.items()}
    print(f"\nrolling update: {len(outs)} requests sent, {by['ok']} completed, {len(outs) - by['ok']} failed "
          f"({during} in flight during the two updates); update 1 (new args, 1 -> 2 replicas, every replica "
          f"replaced) {u1_s:.1f} s, update 2 (2 -> 1) {u2_s:.1f} s; {len(outlived)} of 8 long streams "
          f"({long_tokens} tokens, up to {max(d for _, d, _ in longs.values()):.1f} s) completed "
          f"{max(outlived.values()):.1f} s after their replica began stopping")
